"""`manage.py users create USERNAME --role ROLE [--email E] [--password-stdin]`."""

from __future__ import annotations

import sys

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from console.cli import ContractCommand
from console.roles import ROLES
from console.services import UserError, user_create


class Command(ContractCommand):
    help = "Provision console users without the admin pages."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True)
        create = sub.add_parser("create", help="create a user holding one role")
        create.add_argument("username")
        create.add_argument("--role", required=True, choices=ROLES)
        create.add_argument("--email", default="")
        create.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of stdin (otherwise the user cannot log in "
            "until a password is set)",
        )

    def handle(
        self,
        *args,
        subcommand: str,
        username: str,
        role: str,
        email: str,
        password_stdin: bool,
        **options,
    ):
        password = None
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise CommandError("no password on stdin")
            try:
                validate_password(password)
            except ValidationError as exc:
                raise CommandError(f"password refused: {' '.join(exc.messages)}") from None
        try:
            user = user_create(
                username=username, role=role, email=email, password=password, actor="cli"
            )
        except UserError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"created user {user.username} with role {role}")
