"""`manage.py demo_logins`: print the console URL and the demo users' logins."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand

from console.management.commands.seed_demo import DEMO_USERS


class Command(BaseCommand):
    help = "Print the URL and the demo logins created by seed_demo."

    def add_arguments(self, parser):
        parser.add_argument("--url", default="http://127.0.0.1:8000/")

    def handle(self, *args, url: str, **options):
        self.stdout.write(f"Open {url} and sign in as one of:")
        for username, role, password in DEMO_USERS:
            if User.objects.filter(username=username).exists():
                self.stdout.write(f"  {username:<10} {password:<18} ({role})")
