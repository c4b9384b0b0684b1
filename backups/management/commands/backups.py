"""`manage.py backups list [--cluster C] [--status S] [--json]`: backup sets, newest first.

With --json: {"sets": [objects as `backup --json`]}. Before listing, sets whose worker
died (no heartbeat for JOB_HEARTBEAT_STALE_SECONDS) are marked failed, so the list never
shows a dead backup as running.
"""

from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand

from backups.models import BackupSet
from backups.selectors.backups import backup_set_json, backup_set_list
from backups.services.full_backups import backups_reap_stale
from shards.models import Cluster


class Command(BaseCommand):
    help = "List backup sets."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="list backup sets, newest first")
        listing.add_argument("--cluster", default="")
        listing.add_argument("--kind", choices=BackupSet.Kind.values, default="")
        listing.add_argument("--status", choices=BackupSet.Status.values, default="")
        listing.add_argument("--limit", type=int, default=200)
        listing.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, action: str, **options):
        cluster = options["cluster"]
        if cluster and not Cluster.objects.filter(name=cluster).exists():
            self.stderr.write(f"no cluster named '{cluster}'")
            sys.exit(1)
        backups_reap_stale()
        sets = list(
            backup_set_list(
                cluster=cluster,
                kind=options["kind"],
                status=options["status"],
                limit=options["limit"],
            )
        )
        if options["as_json"]:
            self.stdout.write(json.dumps({"sets": [backup_set_json(s) for s in sets]}))
            return
        self.stdout.write(
            f"{'id':>6}  {'cluster':<16} {'kind':<11} {'consistency':<11} {'status':<10} "
            f"{'rows':>12} {'stored':>12}  error"
        )
        for s in sets:
            self.stdout.write(
                f"{s.pk:>6}  {s.cluster.name:<16} {s.kind:<11} {s.consistency:<11} "
                f"{s.status:<10} {s.rows:>12} {s.stored_bytes:>12}  {s.error[:80]}"
            )
