"""`manage.py restore request|approve|reject|run|show` (DESIGN.md, "Command line")."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.utils import timezone

from backups.models import BackupSet, RestoreRequest, RestoreRun
from backups.selectors.restores import restore_request_as_dict
from backups.services.errors import RestoreError
from backups.services.flashback import flashback_request_file
from backups.services.restore_requests import (
    restore_request_approve,
    restore_request_file,
    restore_request_reject,
)
from backups.services.restore_run_states import restore_run_dequeue, restore_run_start
from backups.services.restore_runs import restore_run_execute
from backups.status import RunStatus
from console.cli import ContractCommand
from console.roles import RoleDenied
from shards.models import Cluster

PICKUP_SECONDS = 3.0
# --wait polls the run from this interval, backing off to POLL_MAX_SECONDS (as `backup`).
POLL_FIRST_SECONDS = 0.02
POLL_MAX_SECONDS = 0.1


def parse_at(text: str, flag: str = "--at") -> datetime:
    """ISO 8601; without an offset it means UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise CommandError(
            f"{flag} {text!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)"
        ) from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


class Command(ContractCommand):
    help = "File, decide, run and show approval-gated restores."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)

        p = sub.add_parser("request", help="file a restore request (prints its id)")
        p.add_argument("--cluster", required=True)
        # Not required here: a flashback names no set or time (checked in do_request). --set and
        # --at together only for rebuild:INSTANCE (a physical set rolled forward to --at).
        p.add_argument("--set", dest="set_id", type=int)
        p.add_argument("--at")
        p.add_argument(
            "--before-gtid",
            dest="before_gtid",
            default="",
            help="stop the GTID's shard right before it, every other shard at its commit second",
        )
        p.add_argument(
            "--flashback",
            action="store_true",
            help="undo the row changes of --gtid G,.. (or of --since/--until on --tables) in place",
        )
        p.add_argument("--gtid", default="", help="with --flashback: the GTIDs to undo")
        p.add_argument("--since", help="with --flashback: start of the window (ISO 8601)")
        p.add_argument(
            "--until",
            action="append",
            default=[],
            help="INSTANCE:FILE:POS, once per instance: stop there (with --flashback: the end "
            "of the window, ISO 8601)",
        )
        p.add_argument("--shards", default="")
        p.add_argument("--tables", default="")
        p.add_argument("--target", help="side, inplace, instance:NAME or rebuild:INSTANCE")
        p.add_argument("--datadir", default="", help="rebuild only: the empty data directory")
        p.add_argument("--reason", required=True)
        p.add_argument("--as", dest="as_user", required=True)
        p.add_argument("--json", action="store_true")

        for name, comment_required in (("approve", False), ("reject", True)):
            p = sub.add_parser(name, help=f"{name} a restore request")
            p.add_argument("request_id", type=int)
            p.add_argument("--as", dest="as_user", required=True)
            p.add_argument("--comment", required=comment_required, default="")
            p.add_argument("--json", action="store_true")

        p = sub.add_parser("run", help="run an approved request (refused otherwise)")
        p.add_argument("request_id", type=int)
        p.add_argument("--wait", action="store_true")
        p.add_argument("--as", dest="as_user", default=None)
        p.add_argument("--json", action="store_true")

        p = sub.add_parser("show", help="show a request, its approvals and results")
        p.add_argument("request_id", type=int)
        p.add_argument("--json", action="store_true")

    def handle(self, *args, **options):
        self.as_json = options.get("json", False)
        self.request_obj: RestoreRequest | None = None
        try:
            getattr(self, f"do_{options['action']}")(options)
        except (RestoreError, RoleDenied) as exc:
            self._fail(str(exc))
        except CommandError as exc:
            self._fail(str(exc))

    # -- helpers ---------------------------------------------------------------------

    def _fail(self, message: str):
        if self.as_json:
            payload = (
                restore_request_as_dict(request=RestoreRequest.objects.get(pk=self.request_obj.pk))
                if self.request_obj is not None
                else {
                    "id": None,
                    "state": None,
                    "target": None,
                    "requested_by": None,
                    "approvals": [],
                    "results": [],
                    "q": None,
                }
            )
            payload["error"] = message
            self.stdout.write(json.dumps(payload))
        raise CommandError(message)

    def _user(self, username: str):
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"no active user named {username!r}")
        return user

    def _request(self, pk: int) -> RestoreRequest:
        request = (
            RestoreRequest.objects.select_related("cluster", "requested_by").filter(pk=pk).first()
        )
        if request is None:
            raise CommandError(f"no restore request {pk}")
        self.request_obj = request
        return request

    def _print(self, request: RestoreRequest, line: str) -> None:
        request.refresh_from_db()
        if self.as_json:
            self.stdout.write(json.dumps(restore_request_as_dict(request=request)))
        else:
            self.stdout.write(line)

    # -- actions ---------------------------------------------------------------------

    def do_request(self, options):
        user = self._user(options["as_user"])
        cluster = Cluster.objects.filter(name=options["cluster"]).first()
        if cluster is None:
            raise CommandError(f"no cluster named {options['cluster']!r}")
        if options.get("flashback"):
            self._request_flashback(user, cluster, options)
            return
        if options.get("gtid") or options.get("since"):
            raise CommandError("--gtid and --since belong to --flashback")
        if (
            options.get("set_id") is None
            and not options.get("at")
            and not options.get("before_gtid")
            and not options.get("until")
        ):
            raise CommandError("give --set, --at, --before-gtid or --until (or --flashback)")
        if not options.get("target"):
            raise CommandError("give --target side, inplace, instance:NAME or rebuild:INSTANCE")
        source_set = at = None
        sources = [
            options.get("set_id") is not None,
            bool(options.get("at")),
            bool(options.get("before_gtid")),
            bool(options.get("until")),
        ]
        if sum(sources) > 1 and not (
            sources == [True, True, False, False] and options["target"].startswith("rebuild:")
        ):
            raise CommandError(
                "give one of --set, --at, --before-gtid or --until "
                "(--set with --at only for rebuild:INSTANCE)"
            )
        if (
            options.get("set_id") is not None
            and options.get("at")
            and not options["target"].startswith("rebuild:")
        ):
            raise CommandError("give --set or --at, not both (both only with rebuild:INSTANCE)")
        if options.get("set_id") is not None:
            source_set = BackupSet.objects.filter(pk=options["set_id"]).first()
            if source_set is None:
                raise CommandError(f"no backup set {options['set_id']}")
        if options.get("at"):
            at = parse_at(options["at"])
        request = restore_request_file(
            cluster=cluster,
            requester=user,
            source_set=source_set,
            at=at,
            before_gtid=options.get("before_gtid") or "",
            until=options.get("until") or [],
            shards=_names(options["shards"]),
            tables=_names(options["tables"]),
            target=options["target"],
            reason=options["reason"],
            datadir=options["datadir"],
        )
        self.request_obj = request
        self._print(request, str(request.pk))

    def _request_flashback(self, user, cluster, options):
        if options.get("set_id") is not None or options.get("at"):
            raise CommandError("--flashback undoes transactions; it takes no --set or --at")
        if options.get("target") not in (None, "inplace"):
            raise CommandError("a flashback changes the live tables: its target is inplace")
        if len(options["until"]) > 1:
            raise CommandError("--flashback takes one --until time")
        since = parse_at(options["since"], "--since") if options.get("since") else None
        until = parse_at(options["until"][0], "--until") if options["until"] else None
        request = flashback_request_file(
            cluster=cluster,
            requester=user,
            gtids=_names(options["gtid"]),
            since=since,
            until=until,
            shards=_names(options["shards"]),
            tables=_names(options["tables"]),
            reason=options["reason"],
        )
        self.request_obj = request
        self._print(request, str(request.pk))

    def do_approve(self, options):
        user = self._user(options["as_user"])
        request = restore_request_approve(
            request=self._request(options["request_id"]), approver=user, comment=options["comment"]
        )
        self._print(request, f"restore {request.pk}: {request.state}")

    def do_reject(self, options):
        user = self._user(options["as_user"])
        request = restore_request_reject(
            request=self._request(options["request_id"]), approver=user, comment=options["comment"]
        )
        self._print(request, f"restore {request.pk}: {request.state}")

    def do_show(self, options):
        request = self._request(options["request_id"])
        data = restore_request_as_dict(request=request)
        if self.as_json:
            self.stdout.write(json.dumps(data))
            return
        source = f"set {data['source_set']}"
        if data.get("flashback"):
            undo = data["flashback"].get("gtids") or [
                f"{data['flashback']['since']}..{data['flashback']['until']}"
            ]
            source = f"flashback of {', '.join(undo)}"
        lines = [
            f"restore {data['id']}: {data['state']} ({data['target']}, cluster {data['cluster']}, "
            f"{source}), requested by {data['requested_by']}: {data['reason']}",
        ]
        if data.get("artifact"):
            plan = data["plan"]
            lines.append(
                f"  undoes {plan.get('rows')} row(s) in {plan.get('statements')} statement(s); "
                f"SQL sha256 {data['artifact']['sha256']}"
            )
        for a in data["approvals"]:
            lines.append(
                f"  {a['decision']} by {a['by']} at {a['at']}"
                + (f": {a['comment']}" if a["comment"] else "")
            )
        for r in data["results"]:
            mark = "ok" if r["checksum_ok"] else "MISMATCH"
            lines.append(
                f"  {r['shard']} {r['database']}.{r['table']} -> {r['target_database']}.{r['target_table']}: "
                f"{r['rows']} rows, checksum {mark}"
            )
        for p in data.get("stop_points") or []:
            lines.append(
                f"  {p['shard']} {p['target']}: stopped at {p['instance']}:{p['file']}:{p['pos']}"
                + (f" after GTID {p['gtid']}" if p.get("gtid") else "")
                + (f", before GTID {p['next_gtid']}" if p.get("next_gtid") else "")
            )
        if data["q"] is not None:
            lines.append(f"  Q = {data['q']:.4f}")
        if data["error"]:
            lines.append(f"  error: {data['error']}")
        self.stdout.write("\n".join(lines))

    def do_run(self, options):
        actor = self._user(options["as_user"]) if options.get("as_user") else None
        request = self._request(options["request_id"])
        run = restore_run_start(request=request, actor=actor)
        if options["wait"]:
            deadline = time.monotonic() + PICKUP_SECONDS
            while time.monotonic() < deadline and self._not_picked_up(run):
                time.sleep(0.2)
            if self._not_picked_up(run) and restore_run_dequeue(run_id=run.pk):
                # No worker took it: run it here rather than leave the caller waiting.
                restore_run_execute(run=run)
            self._wait_for_end(run)
            run.refresh_from_db()
            request.refresh_from_db()
            if run.status != RunStatus.SUCCEEDED:
                q = f"{run.q:.4f}" if run.q is not None else "n/a"
                self._fail(
                    f"restore {request.pk} {run.status} (Q = {q}): {run.error or run.status}"
                )
            self._print(request, f"restore {request.pk}: {request.state}, Q = {run.q:.4f}")
            return
        self._print(request, f"restore {request.pk}: run {run.pk} queued as {run.job_id}")

    def _wait_for_end(self, run: RestoreRun) -> None:
        """Until the run ends; refuse to wait forever on a worker that stopped beating."""
        stale = settings.JOB_HEARTBEAT_STALE_SECONDS
        pause = POLL_FIRST_SECONDS
        while True:
            status, heartbeat = (
                RestoreRun.objects.filter(pk=run.pk).values_list("status", "heartbeat_at").first()
            )
            if RunStatus.is_final(status):
                return
            if heartbeat and (timezone.now() - heartbeat).total_seconds() > stale:
                raise CommandError(
                    f"restore run {run.pk} stopped reporting progress (its worker died?); "
                    f"run `restore run {run.request_id}` again to resume it"
                )
            time.sleep(pause)
            pause = min(pause * 1.5, POLL_MAX_SECONDS)

    @staticmethod
    def _not_picked_up(run: RestoreRun) -> bool:
        status, heartbeat = (
            RestoreRun.objects.filter(pk=run.pk).values_list("status", "heartbeat_at").first()
        )
        if status == RunStatus.PENDING:
            return True
        # A resumed run is RUNNING already; a worker has it once its heartbeat moves.
        return status == RunStatus.RUNNING and heartbeat == run.heartbeat_at
