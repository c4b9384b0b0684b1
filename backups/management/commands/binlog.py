"""`manage.py binlog events CLUSTER [--since ISO] [--until ISO] [--shards S,..] [--tables T,..]
[--json]`: the transactions stored in a cluster's incrementals (DESIGN.md, "Command line")."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from django.core.management.base import CommandError

from backups.engine.errors import EngineError
from backups.selectors.binlog_browser import binlog_transactions
from backups.services.errors import RestoreError
from console.cli import ContractCommand
from shards.models import Cluster


def parse_time(flag: str, text: str | None) -> datetime | None:
    """ISO 8601; without an offset it means UTC."""
    if not text:
        return None
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
    help = "List the transactions stored in a cluster's incremental backups."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("events", help="list stored transactions, oldest first")
        p.add_argument("cluster")
        p.add_argument("--since")
        p.add_argument("--until")
        p.add_argument("--shards", default="")
        p.add_argument("--tables", default="")
        p.add_argument("--json", action="store_true")

    def handle(self, *args, **options):
        self.as_json = options["json"]
        self.cluster_name = options["cluster"]
        try:
            self.do_events(options)
        except (CommandError, RestoreError, EngineError) as exc:
            if self.as_json:
                self.stdout.write(
                    json.dumps(
                        {"cluster": self.cluster_name, "transactions": [], "error": str(exc)}
                    )
                )
            raise CommandError(str(exc)) from exc

    def do_events(self, options):
        cluster = Cluster.objects.filter(name=options["cluster"]).first()
        if cluster is None:
            raise CommandError(f"no cluster named {options['cluster']!r}")
        since = parse_time("--since", options["since"])
        until = parse_time("--until", options["until"])
        if since and until and since > until:
            raise CommandError("--since is after --until")
        transactions = binlog_transactions(
            cluster=cluster,
            since=since,
            until=until,
            shards=_names(options["shards"]),
            tables=_names(options["tables"]),
        )
        if self.as_json:
            # One object, written as it streams: the list is never held whole.
            self.stdout.write(
                f'{{"cluster": {json.dumps(cluster.name)}, "transactions": [', ending=""
            )
            try:
                for index, row in enumerate(transactions):
                    self.stdout.write(("" if index == 0 else ", ") + json.dumps(row), ending="")
            except (RestoreError, EngineError) as exc:
                # Still one object: the transactions listed so far, and why it stopped.
                self.stdout.write(f'], "error": {json.dumps(str(exc))}}}')
                self.as_json = False
                raise CommandError(str(exc)) from exc
            self.stdout.write("]}")
            return
        for row in transactions:
            changes = ", ".join(
                f"{t['table']} +{t['inserted']} ~{t['updated']} -{t['deleted']}"
                for t in row["tables"]
            )
            statement = (row["statement"] or "").replace("\n", " ")[:120]
            self.stdout.write(
                f"{row['committed_at']} {row['gtid']} {row['shard'] or '-'} "
                f"{row['instance']}:{row['file']}:{row['start_pos']}-{row['end_pos']} "
                f"{row['database']} [{changes}] {statement}"
            )
