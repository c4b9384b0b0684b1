"""Point-in-time recovery: resolve an instant to a chain of sets, and roll a shard forward.

* `pitr_resolve(*, cluster, at)` -> (full set, [incrementals in order]) for a restore `--at`.
* `pitr_apply(...)` rolls one restored shard forward to `at` (called by the restore run);
  `chain_apply(...)` does the same through a given chain with plain arguments (drills).
* `chain_cut(chain, at)` and `segment_sources(chain, instance_name)` are the pieces both use.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from django.utils import timezone

from backups.engine import codec
from backups.engine.binlog_apply import SegmentSource, apply_segments
from backups.engine.binlog_events import coordinate_key
from backups.engine.binlog_select import transaction_around, transaction_find
from backups.models import BackupSet, BinlogSegment
from backups.selectors.incrementals import chain_after
from backups.services.errors import ChainError
from backups.services.sets import set_data_key
from backups.services.storage_targets import set_read_storage
from shards.models import Cluster


def pitr_resolve(
    *, cluster: Cluster, at: datetime, method: str = BackupSet.Method.LOGICAL
) -> tuple[BackupSet, list[BackupSet]]:
    """The newest succeeded full set of `method` at or before `at` and the unbroken
    incrementals up to `at`. Logical restores load tables from chunks, so they start from
    logical sets only (a physical set is rebuilt with `rebuild:INSTANCE` instead).

    ChainError when no full set precedes `at` or the chain does not reach it (the
    message names the newest recoverable point).
    """
    if timezone.is_naive(at):
        at = at.replace(tzinfo=UTC)
    # Only the newest full set at or before `at` counts: older chains end before it.
    full = (
        BackupSet.objects.filter(
            cluster=cluster,
            kind=BackupSet.Kind.FULL,
            method=method,
            status=BackupSet.Status.SUCCEEDED,
            consistent_at__lte=at,
        )
        .order_by("-consistent_at", "-id")
        .first()
    )
    if full is None:
        raise ChainError(
            f"no succeeded full backup of {cluster.name} at or before {at.isoformat()}"
            + ("" if method == BackupSet.Method.LOGICAL else f" (method {method})")
        )
    if full.consistent_at >= at:
        return full, []
    chain = chain_after(full)
    try:
        return full, chain_cut(chain, at)
    except ChainError:
        pass  # said again below, in the cluster's words
    newest_point = (chain[-1].consistent_at if chain else None) or full.consistent_at
    raise ChainError(
        f"the backups of {cluster.name} do not reach {at.isoformat()}: "
        f"the newest recoverable point is {newest_point.isoformat()}"
    )


def segment_sources(
    chain: list[BackupSet], instance_name: str, *, reads: list | None = None
) -> list[SegmentSource]:
    """The binlog segments of `instance_name` through `chain`, in order, each opened (read,
    checked against its sha256, decrypted and decompressed) only when the apply reaches it.

    Each incremental is read through its own FallbackStorage; `reads` (when given) collects
    them, so a run can record which target served each segment (`served_record`)."""
    sources = []
    for incremental in chain:
        storage = set_read_storage(incremental)  # falls back to complete copies
        if reads is not None:
            reads.append(storage)
        data_key = set_data_key(incremental)
        for seg in incremental.segments.filter(instance_name=instance_name).order_by("index"):
            entry = {
                "key": seg.key,
                "first_file": seg.first_file,
                "first_pos": seg.first_pos,
                "last_file": seg.last_file,
                "last_pos": seg.last_pos,
                "tables": seg.tables,
            }

            def open_segment(seg=seg, storage=storage, data_key=data_key):
                stored = storage.get_stream(
                    seg.key, expect_sha256=seg.sha256, expect_size=seg.stored_bytes
                )
                return codec.decode(
                    stored, data_key=data_key, aad=seg.key.encode(), object_key=seg.key
                )

            sources.append(SegmentSource(entry=entry, open=open_segment))
    return sources


@dataclass(frozen=True)
class ShardStop:
    """Where one shard's roll-forward stops: a time (inclusive, to the second), a binlog
    position (stop before the first transaction ending past it), or both."""

    until: datetime | None = None
    position: tuple[str, int] | None = None
    before_gtid: str = ""
    label: str = ""


def shard_stop(
    *, at: datetime | None, before_gtid: str = "", stop_positions=(), shard: dict
) -> ShardStop:
    """The stop point of `shard` (a manifest entry: name, instance, database) for a request.

    `--before-gtid`: the GTID's own shard stops right before it, every other shard at its
    commit second (`at`). `--until`: the shard's instance's position. Otherwise `at`.
    """
    for stop in stop_positions or ():
        if stop["instance"] != shard["instance"]:
            continue
        if before_gtid and shard["database"] not in stop.get("databases", []):
            continue
        position = (stop["file"], int(stop["pos"]))
        if before_gtid:
            label = f"stops before GTID {before_gtid} at {stop['file']}:{stop['pos']}"
        else:
            label = (
                f"stops at {stop['instance']}:{stop['file']}:{stop['pos']} (a transaction "
                "boundary: every transaction ending at or before it is applied)"
            )
        return ShardStop(position=position, before_gtid=before_gtid, label=label)
    if at is None:
        return ShardStop(label="at the end of the full set")
    if timezone.is_naive(at):
        at = at.replace(tzinfo=UTC)
    label = f"at {at.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC (whole second)"
    if before_gtid:
        label = f"at the commit second of GTID {before_gtid}: " + label[3:]
    return ShardStop(until=at, label=label)


def pitr_apply(
    *,
    run=None,
    shard: dict,
    target,
    target_database: str,
    at: datetime | None,
    stop_at: tuple[str, int] | None = None,
    table_renames: dict[str, str] | None = None,
    whole_database: bool = False,
    full_set: BackupSet | None = None,
    progress=None,
    should_cancel=None,
    throttle=None,
    segment_reads: list | None = None,
):
    """Roll one restored shard forward from its full set's coordinates to `at` / `stop_at`.

    `shard` is the full set's manifest entry for the shard (name, instance, database,
    binlog_file, binlog_pos); `table_renames` maps source tables to the names they were
    loaded under (None: every table, same names). Applies whole transactions committed
    at or before `at` (to the second) and ending at or before `stop_at` (file, pos),
    idempotently; returns the engine's ApplyResult (with where it stopped). The run records
    `restored_to` only once every shard reached its stop point.
    """
    if full_set is None:
        full_set = run.request.source_set
    if at is not None and timezone.is_naive(at):
        at = at.replace(tzinfo=UTC)
    chain = chain_after(full_set)
    if stop_at is not None:
        chain = chain_cut_position(chain, shard["instance"], stop_at)
    else:
        chain = chain_cut(chain, at)
    result = chain_apply(
        chain=chain,
        shard=shard,
        target=target,
        target_database=target_database,
        until=at if stop_at is None else None,
        stop_at=stop_at,
        table_renames=table_renames,
        whole_database=whole_database,
        progress=progress,
        should_cancel=should_cancel,
        throttle=throttle,
        segment_reads=segment_reads,
    )
    return result


def chain_cut_position(
    chain: list[BackupSet], instance_name: str, position: tuple[str, int]
) -> list[BackupSet]:
    """The links of `chain` whose segments of `instance_name` reach `position`."""
    wanted = coordinate_key(*position)
    needed = []
    for incremental in chain:
        needed.append(incremental)
        for seg in incremental.segments.filter(instance_name=instance_name):
            if coordinate_key(seg.last_file, seg.last_pos) >= wanted:
                return needed
    raise ChainError(
        f"the stored binlog of {instance_name} does not reach {position[0]}:{position[1]}"
    )


def chain_apply(
    *,
    chain: list[BackupSet],
    shard: dict,
    target,
    target_database: str,
    until: datetime | None,
    stop_at: tuple[str, int] | None = None,
    table_renames: dict[str, str] | None = None,
    whole_database: bool = False,
    progress=None,
    should_cancel=None,
    throttle=None,
    segment_reads: list | None = None,
):
    """Roll one restored shard forward through the segments of `chain`, up to `until`.

    `chain` is the incrementals to apply, parent to child (the caller resolved them);
    `shard` is the full set's manifest entry for the shard. No run is recorded: restores
    (`pitr_apply`) and restore drills both call this. Returns the engine's ApplyResult.
    """
    if until is not None and timezone.is_naive(until):
        until = until.replace(tzinfo=UTC)
    sources = segment_sources(chain, shard["instance"], reads=segment_reads)
    return apply_segments(
        target=target,
        source_database=shard["database"],
        target_database=target_database,
        stream=shard["instance"],
        segments=sources,
        start_file=shard["binlog_file"],
        start_pos=int(shard["binlog_pos"]),
        until=until,
        stop_at=stop_at,
        tables=table_renames,
        whole_database=whole_database,
        progress=progress,
        should_cancel=should_cancel,
        # Capture stored every table's events; the policy's excluded tables are never restored.
        excluded=shard.get("excluded_tables") or (),
        throttle=throttle,
    )


def chain_cut(chain: list[BackupSet], at: datetime) -> list[BackupSet]:
    """The links of `chain` needed to reach `at`; ChainError naming the newest point if none does."""
    needed = []
    for incremental in chain:
        needed.append(incremental)
        if incremental.consistent_at and incremental.consistent_at >= at:
            return needed
    newest = chain[-1].consistent_at if chain else None
    raise ChainError(
        f"the chain does not reach {at.isoformat()}: the newest recoverable point is "
        f"{newest.isoformat() if newest else 'the full set itself'}"
    )


# -- stop points: --before-gtid and --until ----------------------------------------------


def _parse_gtid(gtid: str) -> tuple[int, int, int]:
    try:
        domain, server, seq = (int(part) for part in gtid.strip().split("-"))
    except ValueError as exc:
        raise ChainError(f"{gtid!r} is not a GTID (domain-server-sequence, e.g. 0-1-123)") from exc
    return domain, server, seq


def _stored_segments(cluster: Cluster):
    return (
        BinlogSegment.objects.filter(
            backup_set__cluster=cluster,
            backup_set__kind=BackupSet.Kind.INCREMENTAL,
            backup_set__status=BackupSet.Status.SUCCEEDED,
        )
        .select_related("backup_set")
        .order_by("instance_name", "backup_set_id", "index")
    )


def stored_binlog_coverage(cluster: Cluster) -> str:
    """What the stored incrementals of `cluster` cover, per instance: positions and GTIDs."""
    spans: dict[str, list[BinlogSegment]] = {}
    for seg in _stored_segments(cluster):
        spans.setdefault(seg.instance_name, []).append(seg)
    if not spans:
        return f"no incremental of {cluster.name} is stored"
    parts = []
    for instance, segs in sorted(spans.items()):
        segs.sort(key=lambda s: coordinate_key(s.first_file, s.first_pos))
        first, last = segs[0], segs[-1]
        gtids = next((s.first_gtid for s in segs if s.first_gtid), "")
        last_gtid = next((s.last_gtid for s in reversed(segs) if s.last_gtid), "")
        parts.append(
            f"{instance}: {first.first_file}:{first.first_pos}..{last.last_file}:{last.last_pos}"
            + (f" (GTIDs {gtids}..{last_gtid})" if gtids else "")
        )
    return "; ".join(parts)


def _open_segment(seg: BinlogSegment):
    storage = set_read_storage(seg.backup_set)
    data_key = set_data_key(seg.backup_set)
    stored = storage.get_stream(seg.key, expect_sha256=seg.sha256, expect_size=seg.stored_bytes)
    return codec.decode(stored, data_key=data_key, aad=seg.key.encode(), object_key=seg.key)


def _covers_gtid(seg: BinlogSegment, wanted: tuple[int, int, int]) -> bool:
    try:
        first, last = _parse_gtid(seg.first_gtid), _parse_gtid(seg.last_gtid)
    except ChainError:
        return False
    return first[0] == wanted[0] == last[0] and first[2] <= wanted[2] <= last[2]


def _full_before(
    cluster: Cluster, positions: list[dict], at: datetime | None
) -> tuple[BackupSet, list[BackupSet]]:
    """The newest succeeded full set before every position, with a chain reaching them all."""
    fulls = BackupSet.objects.filter(
        cluster=cluster, kind=BackupSet.Kind.FULL, status=BackupSet.Status.SUCCEEDED
    ).order_by("-consistent_at", "-id")
    if at is not None:
        fulls = fulls.filter(consistent_at__lte=at)
    for full in fulls:
        before = True
        for stop in positions:
            for sb in full.shard_backups.filter(instance_name=stop["instance"]):
                if not sb.binlog_file or coordinate_key(sb.binlog_file, sb.binlog_pos or 0) > (
                    coordinate_key(stop["file"], stop["pos"])
                ):
                    before = False
        if not before:
            continue
        chain = chain_after(full)
        try:
            for stop in positions:
                chain_cut_position(chain, stop["instance"], (stop["file"], stop["pos"]))
        except ChainError:
            continue
        return full, chain
    raise ChainError(
        "no succeeded full backup of "
        f"{cluster.name} precedes "
        + ", ".join(f"{p['instance']}:{p['file']}:{p['pos']}" for p in positions)
        + " with an unbroken chain of incrementals up to it"
    )


def pitr_resolve_gtid(*, cluster: Cluster, gtid: str) -> tuple[BackupSet, datetime, dict]:
    """(full set, commit second, stop position) for `--before-gtid GTID`.

    The stop position is where the transaction starts on its instance, with the databases
    it touches (its shards stop there; the others at the commit second). ChainError when
    no stored incremental holds the GTID, naming what is covered.
    """
    wanted = _parse_gtid(gtid)
    gtid = "-".join(str(part) for part in wanted)
    found = []
    for seg in _stored_segments(cluster):
        if not _covers_gtid(seg, wanted):
            continue
        where = transaction_find(_open_segment(seg), gtid)
        if where is not None:
            found.append((seg, where))
            break
    if not found:
        raise ChainError(
            f"GTID {gtid} is in no stored incremental of {cluster.name}; covered: "
            f"{stored_binlog_coverage(cluster)}"
        )
    seg, where = found[0]
    shard_databases = set(
        cluster.shards.filter(instance__name=seg.instance_name).values_list("database", flat=True)
    )
    databases = sorted(set(where["databases"]) & shard_databases)
    if not databases:
        raise ChainError(
            f"GTID {gtid} changes no shard of {cluster.name} "
            f"(it touches {', '.join(where['databases']) or 'no database'} on {seg.instance_name})"
        )
    committed = datetime.fromtimestamp(where["commit_ts"], UTC)
    stop = {
        "instance": seg.instance_name,
        "file": seg.first_file,
        "pos": where["start_pos"],
        "end_pos": where["end_pos"],
        "gtid": gtid,
        "databases": databases,
        "committed_at": committed.isoformat(),
    }
    full, _chain = _full_before(cluster, [stop], committed)
    chain_cut(chain_after(full), committed)
    return full, committed, stop


def _refuse_inside_transaction(instance: str, file: str, pos: int, covering) -> None:
    """A stop position must be a transaction boundary (as `binlog events` lists them).

    A position inside a transaction is refused, not rounded: a DBA who names a position
    expects every transaction up to it applied, and half of one cannot be; rounding down
    silently would drop the transaction the position points into. The message gives the
    two boundaries around it to choose from.
    """
    for seg in covering:
        if seg.first_file != file or seg.last_file != file:
            continue  # positions are per file; a segment across a rotation is not compared
        inside = transaction_around(_open_segment(seg), pos)
        if inside is not None:
            raise ChainError(
                f"--until {instance}:{file}:{pos} is inside transaction {inside['gtid']} "
                f"({file}:{inside['start_pos']}..{inside['end_pos']}); give "
                f"{instance}:{file}:{inside['start_pos']} to stop before it or "
                f"{instance}:{file}:{inside['end_pos']} to stop after it"
            )
        return


def pitr_resolve_positions(*, cluster: Cluster, until: list[str]) -> tuple[BackupSet, list[dict]]:
    """(full set, stop positions) for `--until INSTANCE:FILE:POS` (one per instance).

    ChainError for a malformed or unknown position, or one no stored incremental covers
    (naming what is covered).
    """
    positions: list[dict] = []
    instances = set(cluster.instances.values_list("name", flat=True))
    segments = list(_stored_segments(cluster))
    for text in until:
        parts = text.strip().rsplit(":", 2)
        if len(parts) != 3 or not parts[2].isdigit() or not parts[0] or not parts[1]:
            raise ChainError(f"--until {text!r} is not INSTANCE:FILE:POS")
        instance, file, pos = parts[0], parts[1], int(parts[2])
        if instance not in instances:
            raise ChainError(f"--until {text}: {cluster.name} has no instance named {instance!r}")
        if any(p["instance"] == instance for p in positions):
            raise ChainError(f"--until names instance {instance} twice")
        key = coordinate_key(file, pos)
        covering = [
            s
            for s in segments
            if s.instance_name == instance
            and coordinate_key(s.first_file, s.first_pos) <= key
            and key <= coordinate_key(s.last_file, s.last_pos)
        ]
        if not covering:
            raise ChainError(
                f"{instance}:{file}:{pos} is in no stored incremental of {cluster.name}; "
                f"covered: {stored_binlog_coverage(cluster)}"
            )
        _refuse_inside_transaction(instance, file, pos, covering)
        positions.append({"instance": instance, "file": file, "pos": pos})
    if not positions:
        raise ChainError("--until needs at least one INSTANCE:FILE:POS")
    full, _chain = _full_before(cluster, positions, None)
    return full, positions
