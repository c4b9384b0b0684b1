"""`manage.py demo_logins`: print the console URL and the demo users' logins."""

from __future__ import annotations

import os

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand

from shards.management.commands.seed_demo import DEMO_USERS


class Command(BaseCommand):
    help = "Print the URL and the demo logins created by seed_demo."

    def add_arguments(self, parser):
        # `make run PORT=...` passes PORT through the environment.
        port = os.environ.get("PORT", "8000")
        parser.add_argument("--url", default=f"http://127.0.0.1:{port}/")

    def handle(self, *args, url: str, **options):
        self.stdout.write(f"Open {url} and sign in as one of:")
        for username, role, password in DEMO_USERS:
            if User.objects.filter(username=username).exists():
                self.stdout.write(f"  {username:<10} {password:<18} ({role})")
