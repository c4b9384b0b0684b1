"""Incremental (binlog) backup sets and continuous capture (issue 5).

* `incremental_start(*, cluster, actor)` records an incremental set whose parent is the
  newest succeeded set of the cluster and queues `backup-<id>` on `backups`.
* `incremental_execute(*, backup_set)` (the job) copies each instance's binlog from the
  parent's end coordinates to the coordinates read when it starts, writes `BinlogSegment`
  rows and a signed manifest (`kind: "incremental"`, `parent`, `binlog: [...]`).
* Point-in-time resolution and roll-forward live in `backups.services.pitr`; expiring a
  set (and the check that nothing depends on it) in `backups.services.sets`.
* Continuous capture (an incremental every N minutes) is a schedule of the policy:
  `backups.services.schedules`, which skips a tick while the cluster is busy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from backups import queue
from backups.engine import codec
from backups.engine.binlog import master_status_at
from backups.engine.binlog_events import coordinate_key
from backups.engine.capture import StoredObject, capture_instance
from backups.engine.errors import Cancelled, EngineError
from backups.engine.manifest import manifest_document, manifest_encryption, manifest_write
from backups.models import BackupPolicy, BackupSet, BinlogSegment, ShardBackup
from backups.services.connection_slots import (
    SlotsUnavailable,
    connection_slots_held,
    instance_needs,
)
from backups.services.errors import BackupError, BackupRefused, ChainError, ChainRefused
from backups.services.progress import JobTracker, worker_name
from backups.services.sets import (
    WORKER_ACTOR,
    backup_authorise,
    backup_set_finish_cancelled,
    backup_set_finish_failed,
    backup_set_record,
    busy_reason,
    lock_set,
    set_copies_on_commit,
    set_data_key,
    set_storage,
)
from backups.status import PartStatus, SetStatus
from console.audit import audit_record
from console.keys import manifest_hmac_key
from shards.models import Cluster, Instance
from shards.selectors import instance_endpoint

log = logging.getLogger(__name__)

# Replica server ids used for capture: far from any real server's id.
CAPTURE_SERVER_ID_BASE = 3_900_000_000
# How long a capture waits for a connection slot on an instance at its cap before failing.
SLOT_WAIT_SECONDS = 10 * 60


# ------------------------------------------------------------------------------ start


def _chain_end_coordinates(parent: BackupSet) -> dict[int, tuple[str, int, str]]:
    """shard id -> (file, pos, gtid) where `parent` ends; ChainError when it cannot continue."""
    ends: dict[int, tuple[str, int, str]] = {}
    for sb in parent.shard_backups.all():
        if parent.kind == BackupSet.Kind.FULL:
            file, pos, gtid = sb.binlog_file, sb.binlog_pos, sb.gtid
        else:
            file, pos, gtid = sb.end_binlog_file, sb.end_binlog_pos, sb.end_gtid
        if not file or pos is None:
            raise ChainError(
                f"set {parent.pk} recorded no binlog coordinates for shard {sb.shard_name} "
                f"(binary logging was off on instance {sb.instance_name} when it was taken): "
                "enable log_bin in ROW format, then take a new full backup before incrementals"
            )
        ends[sb.shard_id] = (file, int(pos), gtid or "")
    return ends


def _chain_check(
    cluster: Cluster, shards
) -> tuple[BackupSet | None, dict[int, tuple[str, int, str]], str]:
    """(parent, its end coordinates per shard, "" or why no incremental can follow it)."""
    parent = (
        BackupSet.objects.filter(cluster=cluster, status=SetStatus.SUCCEEDED)
        .order_by("-id")
        .first()
    )
    chain_problem = ""
    ends: dict[int, tuple[str, int, str]] = {}
    if (
        parent is None
        or not BackupSet.objects.filter(
            cluster=cluster, kind=BackupSet.Kind.FULL, status=SetStatus.SUCCEEDED
        ).exists()
    ):
        chain_problem = (
            f"cluster {cluster.name} has no succeeded full backup; "
            "run a full backup before incrementals"
        )
        parent = None
    else:
        try:
            ends = _chain_end_coordinates(parent)
        except ChainError as exc:
            chain_problem = str(exc)
        missing = [s.name for s in shards if s.pk not in ends]
        if missing and not chain_problem:
            chain_problem = (
                f"shard(s) {', '.join(missing)} are not in set {parent.pk}; "
                "the topology changed, so a new full backup is needed"
            )
    return parent, ends, chain_problem


def incremental_chain_problem(cluster: Cluster) -> str:
    """Why an incremental of `cluster` cannot start now ("" when it can): the scheduler takes
    a full backup instead when the chain needs one."""
    shards = list(cluster.shards.select_related("instance").order_by("name"))
    return _chain_check(cluster, shards)[2]


def incremental_start(*, cluster: Cluster, actor, enqueue: bool = True) -> BackupSet:
    """Record an incremental set of `cluster` after its newest succeeded set, and queue it.

    When it cannot start (no succeeded full backup to build on, a parent without binlog
    coordinates, a changed topology, or another backup of the cluster pending or running)
    it records a `failed` set saying why and raises BackupRefused (ChainRefused, also a
    ChainError, for chain problems) carrying it.
    """
    backup_authorise(actor)
    with transaction.atomic():
        cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
        shards = list(cluster.shards.select_related("instance").order_by("name"))
        parent, ends, chain_problem = _chain_check(cluster, shards)
        # A backup that cannot start is still recorded, as failed with its reason (DESIGN.md).
        refused = chain_problem or busy_reason(cluster)
        policy = BackupPolicy.objects.filter(cluster=cluster).first()

        def coordinates(shard) -> dict:
            file, pos, gtid = ends.get(shard.pk, ("", None, ""))
            return {"binlog_file": file, "binlog_pos": pos, "gtid": gtid}

        backup_set = backup_set_record(
            cluster=cluster,
            shards=shards,
            actor=actor,
            refused=refused,
            enqueue=enqueue,
            shard_fields=coordinates,
            details={"parent": parent.pk if parent else None},
            kind=BackupSet.Kind.INCREMENTAL,
            parent=parent,
            consistency=parent.consistency if parent else BackupSet.Consistency.LOCKED,
            compression_level=(
                policy.compression_level if policy else getattr(parent, "compression_level", 1)
            ),
            encrypted=bool(policy.encrypt) if policy else bool(getattr(parent, "encrypted", False)),
        )
    if chain_problem:
        raise ChainRefused(chain_problem, backup_set)
    if refused:
        raise BackupRefused(refused, backup_set)
    return backup_set


# ---------------------------------------------------------------------------- execute


def _counting(chunks: Iterable[bytes], counter: list[int]) -> Iterator[bytes]:
    for chunk in chunks:
        counter[0] += len(chunk)
        yield chunk


def _segment_store(storage, *, level: int, data_key: bytes | None):
    def store(key: str, chunks: Iterable[bytes]) -> StoredObject:
        raw = [0]
        encoded = codec.encode(
            _counting(chunks, raw), level=level, data_key=data_key, aad=key.encode()
        )
        stored = storage.put_stream(key, encoded)
        return StoredObject(
            key=key, raw_bytes=raw[0], stored_bytes=stored.size, sha256=stored.sha256
        )

    return store


def _begin(backup_set: BackupSet) -> bool:
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status != SetStatus.PENDING:
            return False
        now = timezone.now()
        locked.status = SetStatus.RUNNING
        locked.started_at = now
        locked.heartbeat_at = now
        locked.save(update_fields=["status", "started_at", "heartbeat_at"])
        locked.shard_backups.update(status=PartStatus.RUNNING, started_at=now, worker=worker_name())
        audit_record(
            actor=WORKER_ACTOR, action="backup.run", obj=locked, details={"kind": "incremental"}
        )
    return True


def incremental_execute(*, backup_set: BackupSet) -> BackupSet:
    """Capture the set's binlog ranges; the set ends `succeeded` or `failed` with the reason.

    Runs only a `pending` set (a duplicate job returns the set unchanged). A parent that
    is no longer succeeded, or start coordinates purged from a server, fail the set with
    a message saying a new full backup is needed; no event is ever skipped.
    """
    if not _begin(backup_set):
        return BackupSet.objects.get(pk=backup_set.pk)
    backup_set = BackupSet.objects.select_related("cluster", "parent").get(pk=backup_set.pk)
    shard_backups = list(backup_set.shard_backups.select_related("shard__instance"))
    tracker = JobTracker(BackupSet, backup_set.pk).start()
    failure: BaseException | None = None
    try:
        parent = backup_set.parent
        if parent is None or parent.status != SetStatus.SUCCEEDED:
            raise ChainError(
                f"the parent set {backup_set.parent_id} is no longer usable; "
                "the chain is broken, so a new full backup is needed"
            )
        storage = set_storage(backup_set)
        data_key = set_data_key(backup_set)
        store = _segment_store(storage, level=backup_set.compression_level, data_key=data_key)
        by_instance: dict[int, list[ShardBackup]] = {}
        for sb in shard_backups:
            by_instance.setdefault(sb.shard.instance_id, []).append(sb)
        instances = {i.pk: i for i in Instance.objects.filter(pk__in=by_instance)}
        with _capture_slots(backup_set, instances.values(), tracker):
            captures, covered = _capture_all(
                backup_set, by_instance, instances, store, tracker, encrypted=data_key is not None
            )
        doc = _manifest(backup_set, captures, covered)
        manifest_sha = _write_manifest(storage, backup_set, doc)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the set
        failure = exc
    finally:
        # The tracker's last write comes before the finish transition's progress line.
        tracker.stop()
    if isinstance(failure, Cancelled):
        return backup_set_finish_cancelled(backup_set)
    if failure is not None:
        if not isinstance(failure, (EngineError, BackupError)):
            log.error("incremental set %s failed", backup_set.pk, exc_info=failure)
        return backup_set_finish_failed(backup_set, str(failure) or failure.__class__.__name__)
    return _finish(
        backup_set, captures=captures, manifest_sha256=manifest_sha, covered=doc_covered(doc)
    )


@contextmanager
def _capture_slots(backup_set: BackupSet, instances, tracker: JobTracker):
    """One connection slot per server for the whole capture (it opens one connection at a
    time on each: coordinates, the binlog list, then the binlog dump), or Cancelled /
    BackupError after waiting SLOT_WAIT_SECONDS for an instance at its cap."""
    needs, names = instance_needs(instances, minimum=1)
    try:
        with connection_slots_held(
            needs=needs,
            names=names,
            holder=incremental_slot_holder(backup_set.pk),
            wait=SLOT_WAIT_SECONDS,
            tracker=tracker,
            queue_name=queue.BACKUPS,
        ):
            tracker.say("reading the binlog coordinates of every instance")
            yield
    except SlotsUnavailable as exc:
        if tracker.should_cancel():
            raise Cancelled("the incremental was cancelled while waiting for slots") from None
        raise BackupError(f"incremental could not start: {exc}") from None


def incremental_slot_holder(set_id: int) -> str:
    return f"incremental-{set_id}"


def _capture_all(backup_set: BackupSet, by_instance, instances, store, tracker, *, encrypted):
    """Capture every instance's binlog range; ([(instance, shard parts, capture)], covered)."""
    endpoints = {pk: instance_endpoint(instances[pk]) for pk in by_instance}
    # Read every instance's end first, so the set covers one moment across the cluster.
    ends = {pk: master_status_at(endpoints[pk]) for pk in by_instance}
    covered = min(end[3] for end in ends.values()).replace(microsecond=0) - timedelta(seconds=1)
    captures = []
    for index, (pk, sbs) in enumerate(sorted(by_instance.items())):
        start = min(
            ((sb.binlog_file, sb.binlog_pos) for sb in sbs), key=lambda c: coordinate_key(*c)
        )
        end_file, end_pos, end_gtid, _read_at = ends[pk]
        capture = capture_instance(
            endpoint=endpoints[pk],
            instance=instances[pk].name,
            start_file=start[0],
            start_pos=int(start[1]),
            end_file=end_file,
            end_pos=end_pos,
            end_gtid=end_gtid,
            set_prefix=backup_set.object_prefix,
            store=store,
            server_id=CAPTURE_SERVER_ID_BASE + (backup_set.pk % 10_000_000) * 10 + index % 10,
            encrypted=encrypted,
            progress=tracker.progress,
            should_cancel=tracker.should_cancel,
        )
        captures.append((instances[pk], sbs, capture))
    return captures, covered


def doc_covered(doc: dict) -> datetime:
    return datetime.fromisoformat(doc["consistent_at"])


def _manifest(backup_set: BackupSet, captures, covered: datetime) -> dict:
    """The incremental's manifest. `consistent_at`: every event stamped at or before it is in
    this chain (the newest captured event, or a second before the servers' clocks were read
    with the end coordinates, whichever is later)."""
    segments = [seg.manifest_entry() for _i, _s, cap in captures for seg in cap.segments]
    newest = max((cap.last_event_at for _i, _s, cap in captures if cap.last_event_at), default=None)
    candidates = [t for t in (newest, covered, backup_set.parent.consistent_at) if t]
    consistent_at = max(candidates)
    return manifest_document(
        cluster=backup_set.cluster.name,
        set_id=backup_set.pk,
        kind="incremental",
        parent=backup_set.parent_id,
        consistency=backup_set.consistency,
        created_at=backup_set.created_at.isoformat(),
        consistent_at=consistent_at.isoformat() if consistent_at else None,
        compression_level=backup_set.compression_level,
        encryption=(
            manifest_encryption(key_id=backup_set.key_id, wrapped_key=backup_set.wrapped_key)
            if backup_set.encrypted
            else None
        ),
        shards=[
            {
                "name": sb.shard_name,
                "instance": instance.name,
                "database": sb.database,
                "binlog_file": sb.binlog_file,
                "binlog_pos": sb.binlog_pos,
                "end_binlog_file": cap.end_file,
                "end_binlog_pos": cap.end_pos,
                "end_gtid": cap.end_gtid,
                "tables": [],
            }
            for instance, sbs, cap in captures
            for sb in sbs
        ],
        instances=[
            {
                "name": instance.name,
                "start_file": cap.start_file,
                "start_pos": cap.start_pos,
                "end_file": cap.end_file,
                "end_pos": cap.end_pos,
                "end_gtid": cap.end_gtid,
            }
            for instance, _sbs, cap in captures
        ],
        binlog=segments,
        totals={
            "events": sum(cap.events for _i, _s, cap in captures),
            "raw_bytes": sum(cap.raw_bytes for _i, _s, cap in captures),
            "stored_bytes": sum(cap.stored_bytes for _i, _s, cap in captures),
            "objects": len(segments),
        },
    )


def _write_manifest(storage, backup_set: BackupSet, doc: dict) -> str:
    return manifest_write(storage, backup_set.object_prefix, doc, manifest_hmac_key()).sha256


def _finish(
    backup_set: BackupSet,
    *,
    captures,
    manifest_sha256: str,
    covered: datetime | None,
) -> BackupSet:
    now = timezone.now()
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status != SetStatus.RUNNING:
            # The reaper or a cancel got there first: never turn that into a success.
            return locked
        locked.finished_at = now
        newest = None
        raw = stored = 0
        for instance, sbs, cap in captures:
            for seg in cap.segments:
                BinlogSegment.objects.create(
                    backup_set=locked,
                    instance=instance,
                    instance_name=instance.name,
                    index=seg.index,
                    key=seg.key,
                    first_file=seg.first_file,
                    first_pos=seg.first_pos,
                    last_file=seg.last_file,
                    last_pos=seg.last_pos,
                    first_gtid=seg.first_gtid,
                    last_gtid=seg.last_gtid,
                    first_event_at=seg.first_event_at,
                    last_event_at=seg.last_event_at,
                    events=seg.events,
                    raw_bytes=seg.raw_bytes,
                    stored_bytes=seg.stored_bytes,
                    sha256=seg.sha256,
                    tables=seg.tables,
                )
            if cap.last_event_at and (newest is None or cap.last_event_at > newest):
                newest = cap.last_event_at
            raw += cap.raw_bytes
            stored += cap.stored_bytes
            for sb in sbs:
                sb.end_binlog_file = cap.end_file
                sb.end_binlog_pos = cap.end_pos
                sb.end_gtid = cap.end_gtid
                sb.status = PartStatus.SUCCEEDED
                sb.finished_at = now
                sb.raw_bytes = sum(s.raw_bytes for s in cap.segments)
                sb.stored_bytes = sum(s.stored_bytes for s in cap.segments)
                sb.save(
                    update_fields=[
                        "end_binlog_file",
                        "end_binlog_pos",
                        "end_gtid",
                        "status",
                        "finished_at",
                        "raw_bytes",
                        "stored_bytes",
                    ]
                )
        locked.status = SetStatus.SUCCEEDED
        locked.consistent_at = covered or newest
        locked.raw_bytes = raw
        locked.stored_bytes = stored
        locked.manifest_sha256 = manifest_sha256
        locked.progress_text = f"{sum(c.events for _i, _s, c in captures)} binlog events"
        locked.save()
        audit_record(
            actor=WORKER_ACTOR,
            action="backup.succeed",
            obj=locked,
            details={
                "kind": "incremental",
                "raw_bytes": raw,
                "stored_bytes": stored,
                "consistent_at": locked.consistent_at,
            },
        )
        set_copies_on_commit(locked)
    return locked
