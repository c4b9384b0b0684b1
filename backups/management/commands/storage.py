"""`manage.py storage add NAME URL [--endpoint URL] --as USER [--json]` and
`manage.py storage list [--json]`: the storage targets sets are copied to.

`list --json` prints {"targets": [{"name", "url", "default"}]}: `default` is STORAGE_URL.
URLs never carry credentials (S3 credentials come from boto3's chain), so none is printed.
"""

from __future__ import annotations

import json

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from backups.services.storage_targets import (
    S3_OPTIONS,
    StorageTargetError,
    storage_target_add,
    storage_targets_list,
)
from console.roles import RoleDenied


class Command(BaseCommand):
    help = "Storage targets: add one (admins) or list them."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)

        add = sub.add_parser("add", help="add a storage target (admins)")
        add.add_argument("name")
        add.add_argument("url", help="file:///absolute/path or s3://bucket/prefix")
        add.add_argument("--endpoint", default="", help="S3-compatible endpoint URL")
        add.add_argument(
            "--option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"S3 option ({', '.join(S3_OPTIONS)}); repeatable",
        )
        add.add_argument("--check", action="store_true", help="list the target once first")
        add.add_argument("--as", dest="as_user", required=True)
        add.add_argument("--json", action="store_true", dest="as_json")

        listing = sub.add_parser("list", help="list storage targets")
        listing.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, action: str, **options):
        if action == "add":
            return self._add(**options)
        return self._list(**options)

    def _add(self, *, name, url, endpoint, option, check, as_user, as_json, **_):
        def fail(message: str):
            if as_json:  # one JSON object on stdout, also when the command fails
                self.stdout.write(json.dumps({"name": name, "default": False, "error": message}))
            raise CommandError(message)

        user = get_user_model().objects.filter(username=as_user, is_active=True).first()
        if user is None:
            fail(f"no active user named {as_user!r}")
        parsed = {}
        for item in option:
            key, sep, value = item.partition("=")
            if not sep or not key:
                fail(f"--option {item!r} must be KEY=VALUE")
            parsed[key] = value
        try:
            target = storage_target_add(
                name=name,
                url=url,
                endpoint=endpoint,
                options=parsed,
                user=user,
                check_reachable=check,
            )
        except (StorageTargetError, RoleDenied) as exc:
            fail(str(exc))
        if as_json:
            self.stdout.write(
                json.dumps({"name": target.name, "url": target.url, "default": False, "error": ""})
            )
        else:
            self.stdout.write(f"storage target {target.name} added: {target.url}")

    def _list(self, *, as_json, **_):
        targets = storage_targets_list()
        if as_json:
            self.stdout.write(
                json.dumps(
                    {
                        "targets": [
                            {
                                "name": t["name"],
                                "url": t["url"],
                                "default": t["default"],
                                "endpoint": t["endpoint"],
                            }
                            for t in targets
                        ]
                    }
                )
            )
            return
        for t in targets:
            mark = " (default)" if t["default"] else ""
            where = f" at {t['endpoint']}" if t["endpoint"] else ""
            self.stdout.write(f"{t['name']}{mark}  {t['url']}{where}")
