"""The plan of a rebuild (fault recovery from a physical set): which set, which object,
how large, how long (from measured throughput), and the steps (see services/rebuild.py).

`rebuild_source_resolve` picks the physical full set; `rebuild_plan_build` refuses what
would fail (no copy of the instance, object missing or resized, a datadir that is not an
absolute path to an empty directory, a chain that does not reach `at`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.db.models import F, Sum
from django.utils import timezone

from backups.engine.physical import datadir_problem
from backups.models import BackupSet, RestoreRequest, RestoreRun
from backups.selectors.incrementals import chain_after
from backups.services.errors import ChainError, RestoreError
from backups.services.pitr import chain_cut
from backups.services.restore_plan import restore_plan_target_record
from backups.services.sets import set_manifest
from backups.services.storage_targets import set_read_storage
from backups.status import RunStatus, SetStatus
from shards.models import Cluster, Instance

Target = RestoreRequest.Target


def rebuild_source_resolve(
    *, cluster: Cluster, source_set: BackupSet | None, at: datetime | None
) -> BackupSet:
    """The physical full set a rebuild starts from: the one given, or the newest succeeded
    physical full set at or before `at`. RestoreError when there is none."""
    if at is not None and timezone.is_naive(at):
        at = at.replace(tzinfo=UTC)
    if source_set is None:
        if at is None:
            raise RestoreError("give a physical backup set or a point in time to rebuild from")
        source_set = (
            BackupSet.objects.filter(
                cluster=cluster,
                kind=BackupSet.Kind.FULL,
                method=BackupSet.Method.PHYSICAL,
                status=SetStatus.SUCCEEDED,
                consistent_at__lte=at,
            )
            .order_by("-consistent_at", "-id")
            .first()
        )
        if source_set is None:
            raise RestoreError(
                f"no succeeded physical full backup of {cluster.name} at or before "
                f"{at.isoformat()}: a rebuild needs a physical set"
            )
    if source_set.cluster_id != cluster.pk:
        raise RestoreError(f"backup set {source_set.pk} belongs to another cluster")
    if source_set.status != SetStatus.SUCCEEDED:
        raise RestoreError(
            f"backup set {source_set.pk} is {source_set.status}; only succeeded sets can be restored"
        )
    if source_set.kind != BackupSet.Kind.FULL or source_set.method != BackupSet.Method.PHYSICAL:
        raise RestoreError(
            f"backup set {source_set.pk} is not a physical full set; a rebuild needs one "
            "(take one with backup --method physical)"
        )
    if at is not None and source_set.consistent_at and at < source_set.consistent_at:
        raise RestoreError(
            f"backup set {source_set.pk} ends at {source_set.consistent_at.isoformat()}, "
            f"after {at.isoformat()}: pick an older physical set"
        )
    return source_set


def _chain_to(source_set: BackupSet, at: datetime | None) -> list[BackupSet]:
    if at is None or (source_set.consistent_at and at <= source_set.consistent_at):
        return []
    try:
        return chain_cut(chain_after(source_set), at)
    except ChainError as exc:
        raise RestoreError(f"cannot roll set {source_set.pk} forward: {exc}") from exc


def measured_rebuild_bytes_per_second() -> float | None:
    """Raw bytes per second of earlier succeeded rebuilds (None without history)."""
    runs = RestoreRun.objects.filter(
        status=RunStatus.SUCCEEDED,
        request__target_kind=Target.REBUILD,
        started_at__isnull=False,
        finished_at__isnull=False,
        bytes_done__gt=0,
    )
    total = runs.aggregate(
        nbytes=Sum("bytes_done"), seconds=Sum(F("finished_at") - F("started_at"))
    )
    if not total["nbytes"] or not total["seconds"]:
        return None
    seconds = total["seconds"].total_seconds()
    return total["nbytes"] / seconds if seconds > 0 else None


def _estimate(raw_bytes: int, rate: float | None) -> tuple[float | None, str]:
    if rate is None:
        return None, "no history yet: no rebuild has finished on this console, so no estimate"
    seconds = raw_bytes / rate
    human = f"{max(1, round(seconds))} s" if seconds < 60 else f"{seconds / 60:.1f} min"
    return seconds, f"about {human} at {rate / 1e6:,.1f} MB/s measured on earlier rebuilds"


def rebuild_plan_build(
    *,
    cluster: Cluster,
    source_set: BackupSet,
    instance: Instance,
    datadir: str,
    at: datetime | None,
    shards=(),
    tables=(),
) -> dict:
    """The plan of a rebuild: the object, its size, an estimate, the steps; RestoreError for
    anything that would refuse (no such instance in the set, object missing or resized,
    datadir not absolute or not empty, a chain that does not reach `at`)."""
    if shards or tables:
        raise RestoreError("a rebuild restores the whole instance: leave out --shards and --tables")
    problem = datadir_problem(datadir)
    if problem:
        raise RestoreError(problem)
    storage = set_read_storage(source_set)  # default first, then complete copies
    doc = set_manifest(source_set, storage)
    part = next((p for p in doc.get("physical") or [] if p.get("instance") == instance.name), None)
    if part is None:
        held = ", ".join(p.get("instance", "") for p in doc.get("physical") or [])
        raise RestoreError(
            f"backup set {source_set.pk} holds no physical copy of instance {instance.name} "
            f"(it holds {held or 'none'})"
        )
    head = storage.head(part["key"])
    if head is None:
        raise RestoreError(
            f"backup set {source_set.pk} cannot be restored: {part['key']} is missing"
        )
    if head.size != int(part["stored_bytes"]):
        raise RestoreError(
            f"backup set {source_set.pk} cannot be restored: {part['key']} has {head.size} bytes, "
            f"expected {part['stored_bytes']}"
        )
    chain = _chain_to(source_set, at)
    shard_entries = [s for s in doc.get("shards") or [] if s.get("instance") == instance.name]
    seconds, text = _estimate(int(part.get("raw_bytes") or 0), measured_rebuild_bytes_per_second())
    steps = [
        f"stream {part['key']} down ({int(part['stored_bytes']):,} bytes stored, "
        f"{int(part.get('raw_bytes') or 0):,} raw) and unpack it with mbstream -x",
        "mariabackup --prepare",
        f"move the prepared files into the empty {datadir}",
    ]
    if at is not None and chain:
        steps.append(
            f"start a throwaway mariadbd on {datadir} and apply the stored binlog of "
            f"{len(chain)} incremental set(s) to {at.isoformat()} for database(s) "
            + ", ".join(s["database"] for s in shard_entries)
        )
    steps.append(f"hand {datadir} to its owner (mysql when it belongs to root)")
    return {
        # The instance an approval covers, as registered when filed: a lost server cannot say
        # who it is, so the run checks that its host, port and user are still these.
        "targets": [restore_plan_target_record(instance, identity="")],
        "source_set": source_set.pk,
        "target_kind": Target.REBUILD,
        "target_instance": instance.name,
        "datadir": datadir,
        "at": at.isoformat() if at else None,
        "consistent_at": source_set.consistent_at.isoformat() if source_set.consistent_at else None,
        "needs_incrementals": bool(chain),
        "chain": [s.pk for s in chain],
        "binlog_file": part.get("binlog_file"),
        "binlog_pos": part.get("binlog_pos"),
        "gtid": part.get("gtid"),
        "object": {
            "key": part["key"],
            "sha256": part.get("sha256", ""),
            "stored_bytes": int(part["stored_bytes"]),
            "raw_bytes": int(part.get("raw_bytes") or 0),
        },
        "objects": 1,
        "rows": 0,
        "bytes": int(part["stored_bytes"]),
        "raw_bytes": int(part.get("raw_bytes") or 0),
        "tables": [],
        "target_databases": [f"{instance.name}:{s['database']}" for s in shard_entries],
        "conflicts": [],
        "excluded": [],
        "steps": steps,
        "estimate_seconds": seconds,
        "estimate": text,
    }
