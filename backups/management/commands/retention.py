"""`manage.py retention apply CLUSTER [--dry-run] [--json]` (DESIGN.md, "Command line").

Applies the cluster's retention (`backups.services.retention`): prints the decision for every
set that is not expired yet, with its reason. With --dry-run nothing is changed. With --json:
{"cluster", "dry_run", "removed": [{"set", "reason"}], "kept": [{"set", "reason"}]} plus
"errors" (sets whose removal did not complete: finished by the next run), "objects_deleted"
and "bytes_freed". Exit 1 when a removal did not complete or the cluster is unknown.
"""

from __future__ import annotations

import json
import sys

from backups.services.retention import retention_apply
from console.cli import ContractCommand
from shards.models import Cluster


class Command(ContractCommand):
    help = "Apply a cluster's retention policy (or show what it would remove with --dry-run)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        apply = sub.add_parser("apply", help="remove the sets the policy no longer keeps")
        apply.add_argument("cluster")
        apply.add_argument("--dry-run", action="store_true")
        apply.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, action: str, cluster: str, dry_run: bool, as_json: bool, **options):
        found = Cluster.objects.filter(name=cluster).first()
        if found is None:
            self._fail(f"no cluster named '{cluster}'", as_json, cluster, dry_run)
        result = retention_apply(cluster=found, dry_run=dry_run)
        if as_json:
            self.stdout.write(json.dumps(result.as_json()))
        else:
            verb = "would remove" if dry_run else "removed"
            for decision in result.removed:
                self.stdout.write(f"{verb:>12} set {decision.set_id}: {decision.reason}")
            for decision in result.kept:
                self.stdout.write(f"{'kept':>12} set {decision.set_id}: {decision.reason}")
            for error in result.errors:
                self.stdout.write(f"{'not removed':>12} set {error['set']}: {error['error']}")
            self.stdout.write(
                f"{len(result.removed)} set(s) {verb}, {len(result.kept)} kept"
                + ("" if dry_run else f", {result.bytes_freed} bytes freed")
            )
        if result.errors:
            first = result.errors[0]
            self.stderr.write(
                f"the removal of {len(result.errors)} set(s) did not complete (set "
                f"{first['set']}: {first['error']}); the next run finishes it"
            )
            sys.exit(1)

    def _fail(self, message: str, as_json: bool, cluster: str, dry_run: bool):
        if as_json:  # one object with the contract's keys, also when the command fails
            doc = {"cluster": cluster, "dry_run": dry_run, "removed": [], "kept": []}
            self.stdout.write(json.dumps(doc | {"error": message}))
        self.stderr.write(message)
        sys.exit(1)
