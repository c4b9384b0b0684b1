"""Point-in-time recovery: resolve an instant to a chain of sets, and roll a shard forward.

* `pitr_resolve(*, cluster, at)` -> (full set, [incrementals in order]) for a restore `--at`.
* `pitr_apply(...)` rolls one restored shard forward to `at` (called by the restore run);
  `chain_apply(...)` does the same through a given chain with plain arguments (drills).
* `chain_cut(chain, at)` and `segment_sources(chain, instance_name)` are the pieces both use.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.utils import timezone

from backups.engine import codec
from backups.engine.binlog_apply import SegmentSource, apply_segments
from backups.models import BackupSet
from backups.selectors.incrementals import chain_after
from backups.services.errors import ChainError
from backups.services.sets import set_data_key, set_storage
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


def segment_sources(chain: list[BackupSet], instance_name: str) -> list[SegmentSource]:
    """The binlog segments of `instance_name` through `chain`, in order, each opened (read,
    checked against its sha256, decrypted and decompressed) only when the apply reaches it."""
    sources = []
    for incremental in chain:
        storage = set_storage(incremental)
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


def pitr_apply(
    *,
    run=None,
    shard: dict,
    target,
    target_database: str,
    at: datetime,
    table_renames: dict[str, str] | None = None,
    full_set: BackupSet | None = None,
    progress=None,
    should_cancel=None,
    throttle=None,
):
    """Roll one restored shard forward from its full set's coordinates to `at`.

    `shard` is the full set's manifest entry for the shard (name, instance, database,
    binlog_file, binlog_pos); `table_renames` maps source tables to the names they were
    loaded under (None: every table, same names). Applies whole transactions committed
    at or before `at` (to the second), idempotently; returns the engine's ApplyResult
    and records the instant on `run.restored_to`.
    """
    if full_set is None:
        full_set = run.request.source_set
    if timezone.is_naive(at):
        at = at.replace(tzinfo=UTC)
    chain = chain_cut(chain_after(full_set), at)
    result = chain_apply(
        chain=chain,
        shard=shard,
        target=target,
        target_database=target_database,
        until=at,
        table_renames=table_renames,
        progress=progress,
        should_cancel=should_cancel,
        throttle=throttle,
    )
    if run is not None:
        type(run).objects.filter(pk=run.pk).update(restored_to=at.replace(microsecond=0))
    return result


def chain_apply(
    *,
    chain: list[BackupSet],
    shard: dict,
    target,
    target_database: str,
    until: datetime,
    table_renames: dict[str, str] | None = None,
    progress=None,
    should_cancel=None,
    throttle=None,
):
    """Roll one restored shard forward through the segments of `chain`, up to `until`.

    `chain` is the incrementals to apply, parent to child (the caller resolved them);
    `shard` is the full set's manifest entry for the shard. No run is recorded: restores
    (`pitr_apply`) and restore drills both call this. Returns the engine's ApplyResult.
    """
    if timezone.is_naive(until):
        until = until.replace(tzinfo=UTC)
    sources = segment_sources(chain, shard["instance"])
    return apply_segments(
        target=target,
        source_database=shard["database"],
        target_database=target_database,
        stream=shard["instance"],
        segments=sources,
        start_file=shard["binlog_file"],
        start_pos=int(shard["binlog_pos"]),
        until=until,
        tables=table_renames,
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
