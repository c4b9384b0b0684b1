"""The binlog browser: the transactions stored in a cluster's incrementals (DESIGN.md).

`binlog_transactions(cluster=..., since=, until=, shards=, tables=)` yields one dict per
transaction (the `binlog events --json` keys), oldest commit first across instances.
Built from the stored segments, decoded on demand and streamed: each instance's segments
are read one after another (one event in memory at a time) and the instances are merged
by commit time. A segment whose table index holds no wanted table, or whose events lie
outside the time window, is never read.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from backups.engine import codec
from backups.engine.binlog_browse import TransactionSummary, segment_transactions
from backups.engine.binlog_events import coordinate_key
from backups.models import BackupSet, BinlogSegment
from backups.services.errors import RestoreError
from backups.services.restore_plan import logical_table_match
from backups.services.sets import set_data_key, set_storage
from shards.models import Cluster, LogicalTable

PAGE_SIZE = 50


@dataclass(frozen=True)
class TableFilter:
    """Which tables a person asked for: `db.table`, a physical table name, or a logical table."""

    exact: frozenset[tuple[str, str]]
    names: frozenset[str]
    patterns: tuple[str, ...]  # logical tables' patterns, matched with a timeout

    def __call__(self, database: str, table: str) -> bool:
        return (
            table in self.names
            or (database, table) in self.exact
            or any(logical_table_match(p, table) for p in self.patterns)
        )


def table_filter(*, cluster: Cluster, tables) -> TableFilter | None:
    """The filter for `tables` (None when no table was named)."""
    tables = [t.strip() for t in tables or () if t and t.strip()]
    if not tables:
        return None
    logical = {lt.name: lt.pattern for lt in LogicalTable.objects.filter(cluster=cluster)}
    exact, names, patterns = set(), set(), []
    for name in tables:
        if name in logical:
            patterns.append(logical[name])
        elif "." in name:
            database, table = name.split(".", 1)
            exact.add((database.strip("`"), table.strip("`")))
        else:
            names.add(name.strip("`"))
    return TableFilter(frozenset(exact), frozenset(names), tuple(patterns))


def _shard_databases(cluster: Cluster, shards) -> dict[tuple[str, str], str]:
    """(instance name, database) -> shard name, for the chosen shards (all when none)."""
    chosen = [s.strip() for s in shards or () if s and s.strip()]
    found = {}
    for shard in cluster.shards.select_related("instance"):
        if not chosen or shard.name in chosen:
            found[(shard.instance.name, shard.database)] = shard.name
    unknown = set(chosen) - set(found.values())
    if unknown:
        raise RestoreError(f"no shard named {', '.join(sorted(unknown))} in cluster {cluster.name}")
    return found


def segment_wanted(segment: BinlogSegment, wants: Callable[[str, str], bool] | None, databases):
    for entry in segment.tables or []:
        database, _, table = entry.partition(".")
        if database != "*" and database not in databases:
            continue
        if table == "*" or wants is None or wants(database, table):
            return True
    return False


def binlog_segments(
    *,
    cluster: Cluster,
    since: datetime | None = None,
    until: datetime | None = None,
    instances=None,
) -> dict[str, list[BinlogSegment]]:
    """Each instance's stored segments in binlog order, narrowed to the time window."""
    segments = BinlogSegment.objects.filter(
        backup_set__cluster=cluster,
        backup_set__kind=BackupSet.Kind.INCREMENTAL,
        backup_set__status=BackupSet.Status.SUCCEEDED,
    ).select_related("backup_set")
    if instances is not None:
        segments = segments.filter(instance_name__in=list(instances))
    if since is not None:
        segments = segments.exclude(last_event_at__lt=since)
    if until is not None:
        segments = segments.exclude(first_event_at__gt=until)
    by_instance: dict[str, list[BinlogSegment]] = {}
    for segment in segments:
        by_instance.setdefault(segment.instance_name, []).append(segment)
    for found in by_instance.values():
        found.sort(key=lambda s: (coordinate_key(s.first_file, s.first_pos), s.backup_set_id))
    return by_instance


def segment_open(segment: BinlogSegment):
    """The segment's decoded bytes, block by block (checked against its sha256)."""
    backup_set = segment.backup_set
    storage = set_storage(backup_set)
    stored = storage.get_stream(
        segment.key, expect_sha256=segment.sha256, expect_size=segment.stored_bytes
    )
    return codec.decode(
        stored,
        data_key=set_data_key(backup_set),
        aad=segment.key.encode(),
        object_key=segment.key,
    )


def instance_transactions(
    segments: list[BinlogSegment],
    *,
    databases: dict[str, str],
    wants: Callable[[str, str], bool] | None,
    since_ts: int | None,
    until_ts: int | None,
) -> Iterator[tuple[BinlogSegment, TransactionSummary]]:
    """One instance's transactions in binlog order; a range two chains both hold is read once."""
    reached: tuple | None = None
    for segment in segments:
        if reached is not None and coordinate_key(segment.last_file, segment.last_pos) <= reached:
            continue
        if not segment_wanted(segment, wants, databases):
            continue

        def in_scope(database: str, table: str) -> bool:
            if not database:
                # A statement without a default database naming no db.table: it cannot be
                # tied to a shard, so it is listed under its instance with database "".
                return wants is None or wants(database, table)
            return database in databases and (wants is None or wants(database, table))

        for summary in segment_transactions(
            segment_open(segment), file=segment.first_file, wants=in_scope
        ):
            end = coordinate_key(summary.file, summary.end_pos)
            if reached is not None and end <= reached:
                continue
            reached = end
            if since_ts is not None and summary.committed_at < since_ts:
                continue
            if until_ts is not None and summary.committed_at > until_ts:
                return
            yield segment, summary


def transaction_as_dict(segment: BinlogSegment, summary: TransactionSummary, shards) -> dict:
    """The `binlog events --json` object of one transaction."""
    instance = segment.instance_name
    database = next(
        (d for d in summary.databases if (instance, d) in shards),
        summary.databases[0] if summary.databases else "",
    )
    return {
        "instance": instance,
        "shard": shards.get((instance, database), ""),
        "database": database,
        "gtid": summary.gtid,
        "file": summary.file,
        "start_pos": summary.start_pos,
        "end_pos": summary.end_pos,
        "committed_at": datetime.fromtimestamp(summary.committed_at, UTC).isoformat(),
        "tables": [
            {
                "table": table if db == database else f"{db}.{table}",
                "inserted": counts[0],
                "updated": counts[1],
                "deleted": counts[2],
            }
            for (db, table), counts in summary.tables.items()
        ],
        "statement": summary.statement or None,
        "ddl": summary.ddl,
        "set": segment.backup_set_id,
    }


def binlog_transactions(
    *,
    cluster: Cluster,
    since: datetime | None = None,
    until: datetime | None = None,
    shards=(),
    tables=(),
) -> Iterator[dict]:
    """Every stored transaction of the cluster in scope, oldest commit first (a generator)."""
    shard_dbs = _shard_databases(cluster, shards)
    wants = table_filter(cluster=cluster, tables=tables)
    per_instance: dict[str, dict[str, str]] = {}
    for (instance, database), shard in shard_dbs.items():
        per_instance.setdefault(instance, {})[database] = shard
    streams = []
    for instance, segments in binlog_segments(
        cluster=cluster, since=since, until=until, instances=per_instance
    ).items():
        stream = instance_transactions(
            segments,
            databases=per_instance[instance],
            wants=wants,
            since_ts=int(since.timestamp()) if since else None,
            until_ts=int(until.timestamp()) if until else None,
        )
        streams.append(stream)
    merged = heapq.merge(*streams, key=lambda pair: pair[1].committed_at)
    for segment, summary in merged:
        yield transaction_as_dict(segment, summary, shard_dbs)


def binlog_transactions_page(*, page: int = 1, page_size: int = PAGE_SIZE, **filters):
    """(rows of page `page`, whether a next page exists); pages count from 1."""
    start = (max(1, page) - 1) * page_size
    rows = []
    more = False
    for index, row in enumerate(binlog_transactions(**filters)):
        if index < start:
            continue
        if len(rows) == page_size:
            more = True
            break
        rows.append(row)
    return rows, more
