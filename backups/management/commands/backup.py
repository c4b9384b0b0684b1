"""`manage.py backup CLUSTER [--kind full|incremental] [--consistency locked|lockfree|cold]
[--method logical|physical] [--wait] [--json]`.

Prints the new set's id (or, with --json, one object: id, cluster, kind, consistency,
method, method_label, status, rows, raw_bytes, stored_bytes, lock_window_ms, error). Exit 0
on success, 1 with a one-line reason on stderr otherwise.

Methods (DESIGN.md): lockfree = hot (no lock), locked = warm (a global read lock of a few
ms), cold = the global read lock held on every instance for the whole dump (writes block;
the one method that may include MyISAM and other non-InnoDB tables).

The set runs on an RQ worker listening on `backups`. With --wait the command blocks
until the set ends and exits 1 unless it succeeded; if no worker takes the job within
about 3 seconds, the command runs the backup itself, in this process, so --wait also
works where no worker is running (cron, CI, a laptop).

Acts as --as USER (needs operator or admin) or, without it, as the system actor "cli"
(whoever can run manage.py already holds the keys to everything it touches).
"""

from __future__ import annotations

import json
import sys
import time

from django.contrib.auth import get_user_model

from backups.models import BackupSet
from backups.selectors.backups import backup_set_json
from backups.services.errors import BackupError, BackupRefused
from backups.services.full_backups import (
    backup_run_in_process_if_unclaimed,
    backup_start,
    backups_reap_stale,
)
from console.cli import ContractCommand
from console.roles import RoleDenied
from shards.models import Cluster

WORKER_GRACE_SECONDS = 3.0
# --wait polls the set's status from this interval, backing off to POLL_MAX_SECONDS: a short
# backup is seen to end within a few ms, a long one costs a query every POLL_MAX_SECONDS.
POLL_FIRST_SECONDS = 0.02
POLL_MAX_SECONDS = 0.1
REAP_EVERY_SECONDS = 5.0


class Command(ContractCommand):
    help = "Back up a cluster (full or incremental); prints the set id."
    # Django's system checks (URL conf, templates, models) cost a few hundred ms on every
    # start and find nothing a backup depends on; `manage.py check` and the server run them.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("cluster")
        parser.add_argument("--kind", choices=["full", "incremental"], default="full")
        parser.add_argument(
            "--consistency",
            choices=["locked", "lockfree", "cold"],
            default="locked",
            help="lockfree: hot, no lock; locked: warm, a global read lock of a few ms; "
            "cold: writes blocked on every instance for the whole dump",
        )
        parser.add_argument("--method", choices=["logical", "physical"], default="logical")
        parser.add_argument("--compression-level", type=int, default=None)
        encrypt = parser.add_mutually_exclusive_group()
        encrypt.add_argument("--encrypt", dest="encrypt", action="store_true", default=None)
        encrypt.add_argument("--no-encrypt", dest="encrypt", action="store_false")
        parser.add_argument(
            "--wait",
            action="store_true",
            help="block until the set ends (exit 1 unless it succeeded); if no worker takes "
            "the job within 3 s, run it in this process",
        )
        parser.add_argument("--json", action="store_true", dest="as_json")
        parser.add_argument(
            "--as", dest="as_user", default="", help="act as this user (operator or admin)"
        )

    def handle(self, *args, **options):
        as_json = self.as_json = options["as_json"]
        self.cluster_name = options["cluster"]
        actor = "cli"
        if options["as_user"]:
            actor = get_user_model().objects.filter(username=options["as_user"]).first()
            if actor is None:
                return self._fail(f"no user named '{options['as_user']}'")
        cluster = Cluster.objects.filter(name=options["cluster"]).first()
        if cluster is None:
            return self._fail(f"no cluster named '{options['cluster']}'")
        try:
            backup_set = backup_start(
                cluster=cluster,
                actor=actor,
                kind=options["kind"],
                consistency=options["consistency"],
                method=options["method"],
                compression_level=options["compression_level"],
                encrypt=options["encrypt"],
            )
        except BackupRefused as exc:
            return self._fail(str(exc), backup_set=exc.backup_set, as_json=as_json)
        except (BackupError, RoleDenied) as exc:
            return self._fail(str(exc))
        if options["wait"]:
            backup_set = self._wait(backup_set)
        if as_json:
            self.stdout.write(json.dumps(backup_set_json(backup_set)))
        else:
            self.stdout.write(str(backup_set.pk))
        if options["wait"] and backup_set.status != BackupSet.Status.SUCCEEDED:
            self.stderr.write(
                f"backup set {backup_set.pk} {backup_set.status}: "
                f"{backup_set.error or 'no reason recorded'}".replace("\n", " ")
            )
            sys.exit(1)

    def _wait(self, backup_set: BackupSet) -> BackupSet:
        backup_set = backup_run_in_process_if_unclaimed(
            backup_set=backup_set, grace_seconds=WORKER_GRACE_SECONDS
        )
        last_reap = time.monotonic()
        pause = POLL_FIRST_SECONDS
        while True:
            backup_set.refresh_from_db(fields=["status"])
            if not backup_set.is_active:
                backup_set.refresh_from_db()
                return backup_set
            if time.monotonic() - last_reap > REAP_EVERY_SECONDS:
                backups_reap_stale()
                last_reap = time.monotonic()
            time.sleep(pause)
            pause = min(pause * 1.5, POLL_MAX_SECONDS)

    def _fail(self, message: str, *, backup_set=None, as_json: bool = False):
        if backup_set is not None and (as_json or self.as_json):
            self.stdout.write(json.dumps(backup_set_json(backup_set)))
        elif self.as_json:  # one JSON object with the contract's keys, also on a refusal
            keys = ("id", "kind", "consistency", "method", "status", "rows", "raw_bytes")
            doc = dict.fromkeys(keys) | dict.fromkeys(("stored_bytes", "lock_window_ms"))
            self.stdout.write(json.dumps(doc | {"cluster": self.cluster_name, "error": message}))
        self.stderr.write(message.replace("\n", " "))
        sys.exit(1)
