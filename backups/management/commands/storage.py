"""`manage.py storage add NAME URL [--endpoint URL] --as USER [--json]`,
`manage.py storage list [--json]` and
`manage.py storage sweep [--cluster C] [--target NAME] [--grace-hours H] [--dry-run] [--json]`.

`list --json` prints {"targets": [{"name", "url", "default"}]}: `default` is STORAGE_URL.
URLs never carry credentials (S3 credentials come from boto3's chain), so none is printed.

Orphan sweep (`backups.services.sweep`): objects under a cluster's prefix that no backup set
references and that are older than the grace period (24 h by default), in every storage
target; deleted, or with --dry-run only listed. Objects of pending or running sets are never
touched. With --json: {"dry_run", "orphans": [{"target", "key", "age_hours"}], "deleted": N}
plus "bytes_freed" and "errors". Exit 1 on a bad argument or when a deletion failed.
"""

from __future__ import annotations

import json
import sys

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from backups.services.errors import BackupError
from backups.services.storage_targets import (
    S3_OPTIONS,
    StorageTargetError,
    storage_target_add,
    storage_targets_list,
)
from backups.services.sweep import DEFAULT_GRACE_HOURS, storage_sweep
from console.cli import ContractCommand
from console.roles import RoleDenied
from shards.models import Cluster


class Command(ContractCommand):
    help = "Storage targets: add one (admins), list them, sweep orphaned objects."

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

        sweep = sub.add_parser("sweep", help="delete (or list) objects no backup set references")
        sweep.add_argument("--cluster", default="")
        sweep.add_argument("--target", default="")
        sweep.add_argument("--grace-hours", type=float, default=DEFAULT_GRACE_HOURS)
        sweep.add_argument("--dry-run", action="store_true")
        sweep.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, action: str, **options):
        if action == "add":
            return self._add(**options)
        if action == "sweep":
            self.as_json = options["as_json"]
            self.dry_run = options["dry_run"]
            return self.do_sweep(options)
        return self._list(**options)

    def _add(self, *, name, url, endpoint, option, check, as_user, as_json, **_):
        def fail(message: str):
            if as_json:  # one JSON object on stdout, also when the command fails
                self.stdout.write(
                    json.dumps({"name": name, "url": url, "default": False, "error": message})
                )
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

    def do_sweep(self, options):
        cluster = None
        if options["cluster"]:
            cluster = Cluster.objects.filter(name=options["cluster"]).first()
            if cluster is None:
                self._fail(f"no cluster named '{options['cluster']}'")
        try:
            result = storage_sweep(
                cluster=cluster,
                target=options["target"],
                grace_hours=options["grace_hours"],
                dry_run=options["dry_run"],
            )
        except BackupError as exc:
            self._fail(str(exc))
        if self.as_json:
            self.stdout.write(json.dumps(result.as_json()))
        else:
            verb = "orphan" if result.dry_run else "deleted"
            for orphan in result.orphans:
                self.stdout.write(
                    f"{verb} {orphan.target}:{orphan.key} ({orphan.age_hours:.1f} h old)"
                )
            self.stdout.write(
                f"{len(result.orphans)} orphan(s) found, {result.deleted} deleted"
                + (" (dry run)" if result.dry_run else f", {result.bytes_freed} bytes freed")
            )
        if result.errors:
            first = result.errors[0]
            self.stderr.write(
                f"{len(result.errors)} orphan(s) could not be deleted ({first['target']}:"
                f"{first['key']}: {first['error']})"
            )
            sys.exit(1)

    def _fail(self, message: str):
        if self.as_json:  # one object with the contract's keys, also when the command fails
            doc = {"dry_run": self.dry_run, "orphans": [], "deleted": 0, "error": message}
            self.stdout.write(json.dumps(doc))
        self.stderr.write(message)
        sys.exit(1)
