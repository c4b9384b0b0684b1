"""`manage.py policy show CLUSTER [--json]` and `manage.py policy set CLUSTER [...] --as USER`.

`set` takes every flag of DESIGN.md (`none` clears full_cron, exclude_tables, copy_to and
webhook); only the fields given change, and only an admin (`--as`) may change them. A bad
value is refused with one sentence naming the field, and nothing is saved. Both print the
policy (`--json`: one object with the keys of DESIGN.md).
"""

from __future__ import annotations

import json
import sys

from django.contrib.auth import get_user_model

from backups.selectors.policies import policy_for, policy_json
from backups.services.errors import BackupError
from backups.services.policies import policy_update
from console.cli import ContractCommand
from console.roles import ADMIN, RoleDenied, has_role
from shards.models import Cluster

# flag -> policy field; every value is handed to the service as text, which checks it.
SET_FLAGS = {
    "--full-cron": "full_cron",
    "--full-consistency": "full_consistency",
    "--full-method": "full_method",
    "--exclude-tables": "exclude_tables",
    "--max-threads-running": "max_threads_running",
    "--incremental-every": "incremental_every_minutes",
    "--keep-full": "keep_full",
    "--keep-daily": "keep_daily",
    "--keep-weekly": "keep_weekly",
    "--keep-monthly": "keep_monthly",
    "--keep-days": "keep_days",
    "--copy-to": "copy_to",
    "--encrypt": "encrypt",
    "--compression-level": "compression_level",
    "--rpo-minutes": "rpo_target_minutes",
    "--drill-every-days": "drill_every_days",
    "--webhook": "webhook_url",
}


class Command(ContractCommand):
    help = "Show or change a cluster's backup policy (schedules, retention, exclusions)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        show = sub.add_parser("show", help="print the cluster's policy")
        show.add_argument("cluster")
        show.add_argument("--json", action="store_true", dest="as_json")
        change = sub.add_parser("set", help="change fields of the cluster's policy (admins)")
        change.add_argument("cluster")
        for flag, field in SET_FLAGS.items():
            change.add_argument(flag, dest=field, default=None, metavar="VALUE")
        change.add_argument("--as", dest="as_user", required=True, help="an admin's username")
        change.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, **options):
        self.as_json = options["as_json"]
        self.cluster_name = options["cluster"]
        cluster = Cluster.objects.filter(name=options["cluster"]).first()
        if cluster is None:
            return self._fail(f"no cluster named '{options['cluster']}'")
        if options["action"] == "set":
            self._set(cluster, options)
        self._print(policy_for(cluster), options["as_json"])

    def _set(self, cluster: Cluster, options) -> None:
        user = get_user_model().objects.filter(username=options["as_user"]).first()
        if user is None:
            return self._fail(f"no user named '{options['as_user']}'")
        if not has_role(user, ADMIN):
            return self._fail(f"{user.username} may not change backup policies (admins only)")
        changes = {f: options[f] for f in SET_FLAGS.values() if options[f] is not None}
        if not changes:
            return self._fail("nothing to change: give at least one policy flag (see --help)")
        try:
            policy_update(cluster=cluster, actor=user, changes=changes, source="cli")
        except (BackupError, RoleDenied) as exc:
            return self._fail(str(exc))

    def _print(self, policy, as_json: bool) -> None:
        doc = policy_json(policy)
        if as_json:
            self.stdout.write(json.dumps(doc))
            return
        for key, value in doc.items():
            if isinstance(value, list):
                value = ", ".join(value) or "none"
            elif isinstance(value, bool):
                value = "on" if value else "off"
            elif value == "":
                value = "none"
            self.stdout.write(f"{key}: {value}")

    def _fail(self, message: str):
        if self.as_json:  # one JSON object on stdout, also when the command fails
            self.stdout.write(json.dumps({"cluster": self.cluster_name, "error": message}))
        self.stderr.write(message.replace("\n", " "))
        sys.exit(1)
