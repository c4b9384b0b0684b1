"""`manage.py backups list|show|hold|release` (DESIGN.md, "Command line").

* `list [--cluster C] [--status S] [--json]`: sets, newest first; with --json
  {"sets": [objects as `backup --json`]}. Before listing, sets whose worker died (no
  heartbeat for JOB_HEARTBEAT_STALE_SECONDS) are marked failed, so the list never shows a
  dead backup as running.
* `show SET_ID [--json]`: one set with its parent, trigger, hold, copies and shards.
* `hold SET_ID --as USER [--reason TEXT] [--json]`: retention never removes a held set (or its
  chain); operators and admins. `release SET_ID --as USER [--reason TEXT] [--json]`: admins.
  Both print the set as `show` does.

An unknown set, user or cluster, or a refused hold or release: one line on stderr, exit 1
(with --json, also {"error": ...} on stdout).
"""

from __future__ import annotations

import json
import sys

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from backups.models import BackupSet
from backups.selectors.backups import (
    backup_set_detail,
    backup_set_json,
    backup_set_list,
    backup_set_show_json,
)
from backups.services.errors import BackupError
from backups.services.full_backups import backups_reap_stale
from backups.services.holds import backup_set_hold, backup_set_release
from console.cli import ContractCommand
from console.roles import RoleDenied
from shards.models import Cluster


class Command(ContractCommand):
    help = "List and show backup sets; put them on hold or release them."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="list backup sets, newest first")
        listing.add_argument("--cluster", default="")
        listing.add_argument("--kind", choices=BackupSet.Kind.values, default="")
        listing.add_argument("--status", choices=BackupSet.Status.values, default="")
        listing.add_argument("--limit", type=int, default=200)
        listing.add_argument("--json", action="store_true", dest="as_json")

        show = sub.add_parser("show", help="one set: coordinates, shards, hold, copies")
        show.add_argument("set_id", type=int)
        show.add_argument("--json", action="store_true", dest="as_json")

        for name, text in (
            ("hold", "keep a set (and its chain) from retention (operators, admins)"),
            ("release", "lift a set's hold (admins only)"),
        ):
            p = sub.add_parser(name, help=text)
            p.add_argument("set_id", type=int)
            p.add_argument("--as", dest="as_user", required=True)
            p.add_argument("--reason", default="")
            p.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, action: str, **options):
        self.as_json = options["as_json"]
        try:
            getattr(self, f"do_{action}")(options)
        except (CommandError, BackupError, RoleDenied) as exc:
            message = str(exc)
            if self.as_json:
                doc = {"sets": []} if action == "list" else {"id": options.get("set_id")}
                self.stdout.write(json.dumps(doc | {"error": message}))
            self.stderr.write(message)
            sys.exit(1)

    # -- actions ---------------------------------------------------------------------

    def do_list(self, options):
        cluster = options["cluster"]
        if cluster and not Cluster.objects.filter(name=cluster).exists():
            raise CommandError(f"no cluster named '{cluster}'")
        backups_reap_stale()
        sets = list(
            backup_set_list(
                cluster=cluster,
                kind=options["kind"],
                status=options["status"],
                limit=options["limit"],
            )
        )
        if self.as_json:
            self.stdout.write(json.dumps({"sets": [backup_set_json(s) for s in sets]}))
            return
        self.stdout.write(
            f"{'id':>6}  {'cluster':<16} {'kind':<11} {'method':<24} {'status':<10} "
            f"{'rows':>12} {'stored':>12}  error"
        )
        for s in sets:
            self.stdout.write(
                f"{s.pk:>6}  {s.cluster.name:<16} {s.kind:<11} {s.method_label:<24} "
                f"{s.status:<10} {s.rows:>12} {s.stored_bytes:>12}  {s.error[:80]}"
            )

    def do_show(self, options):
        self._print(self._set(options["set_id"]))

    def do_hold(self, options):
        backup_set = self._set(options["set_id"])
        backup_set_hold(
            backup_set=backup_set, actor=self._user(options["as_user"]), reason=options["reason"]
        )
        self._print(self._set(backup_set.pk))

    def do_release(self, options):
        backup_set = self._set(options["set_id"])
        backup_set_release(
            backup_set=backup_set, actor=self._user(options["as_user"]), reason=options["reason"]
        )
        self._print(self._set(backup_set.pk))

    # -- helpers ---------------------------------------------------------------------

    def _set(self, set_id: int) -> BackupSet:
        try:
            return backup_set_detail(set_id=set_id)
        except BackupSet.DoesNotExist:
            raise CommandError(f"no backup set {set_id}") from None

    def _user(self, username: str):
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"no active user named {username!r}")
        return user

    def _print(self, backup_set: BackupSet) -> None:
        data = backup_set_show_json(backup_set)
        if self.as_json:
            self.stdout.write(json.dumps(data))
            return
        hold = data["hold"]
        lines = [
            f"set {data['id']}  {data['cluster']}  {data['kind']} · {data['method_label']}  "
            f"{data['status']}",
            f"parent: {data['parent'] or '—'}",
            f"triggered by: {data['triggered_by'] or 'system'} ({data['trigger']})",
            f"created: {data['created_at']}  started: {data['started_at'] or '—'}  "
            f"finished: {data['finished_at'] or '—'}",
            f"consistent at: {data['consistent_at'] or '—'}",
            f"rows: {data['rows']}  raw: {data['raw_bytes']} B  stored: {data['stored_bytes']} B"
            f"  lock window: {data['lock_window_ms'] if data['lock_window_ms'] is not None else '—'} ms",
            f"objects: {data['storage_url']} / {data['object_prefix']}",
            "hold: "
            + (
                f"since {hold['at']} by {hold['by'] or '—'}"
                + (f": {hold['reason']}" if hold["reason"] else "")
                if hold
                else "none"
            ),
            "copies: "
            + (", ".join(f"{c['target']} ({c['state']})" for c in data["copies"]) or "none"),
        ]
        if data["excluded_tables"]:
            lines.append(f"excluded tables: {', '.join(data['excluded_tables'])}")
        if data["error"]:
            lines.append(f"error: {data['error']}")
        lines.append(
            f"{'shard':<12} {'instance':<12} {'database':<24} {'status':<10} {'rows':>12}  "
            "worker / binlog / gtid"
        )
        for shard in data["shards"]:
            where = f"{shard['binlog_file'] or '—'}:{shard['binlog_pos'] or '—'}"
            lines.append(
                f"{shard['name']:<12} {shard['instance']:<12} {shard['database']:<24} "
                f"{shard['status']:<10} {shard['rows']:>12}  {shard['worker'] or '—'} "
                f"{where} {shard['gtid'] or ''}".rstrip()
            )
        self.stdout.write("\n".join(lines))
