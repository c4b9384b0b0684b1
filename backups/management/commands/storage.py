"""`manage.py storage sweep [--cluster C] [--target NAME] [--grace-hours H] [--dry-run] [--json]`.

Orphan sweep (`backups.services.sweep`): objects under a cluster's prefix that no backup set
references and that are older than the grace period (24 h by default), in every storage
target; deleted, or with --dry-run only listed. Objects of pending or running sets are never
touched. With --json: {"dry_run", "orphans": [{"target", "key", "age_hours"}], "deleted": N}
plus "bytes_freed" and "errors". Exit 1 on a bad argument or when a deletion failed.
"""

from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand

from backups.services.errors import BackupError
from backups.services.sweep import DEFAULT_GRACE_HOURS, storage_sweep
from shards.models import Cluster


class Command(BaseCommand):
    help = "Storage targets: sweep orphaned objects."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sweep = sub.add_parser("sweep", help="delete (or list) objects no backup set references")
        sweep.add_argument("--cluster", default="")
        sweep.add_argument("--target", default="")
        sweep.add_argument("--grace-hours", type=float, default=DEFAULT_GRACE_HOURS)
        sweep.add_argument("--dry-run", action="store_true")
        sweep.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, action: str, **options):
        self.as_json = options["as_json"]
        getattr(self, f"do_{action}")(options)

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
        if self.as_json:
            self.stdout.write(json.dumps({"error": message}))
        self.stderr.write(message)
        sys.exit(1)
