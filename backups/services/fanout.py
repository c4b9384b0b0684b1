"""Fan-out of a full logical set over RQ workers, one part per instance, with one exact cut
(DESIGN.md "Scale-out").

The owner (`backup_execute`, job `backup-<set>`) plans one part per instance and hands
them to `parts.parts_run` (job `backup-<set>-part-<instance>` on `backups`; a part no
other worker takes within a few seconds runs in the owner itself). `locked` and `cold`
sets take their cut through the Redis barrier of `engine.barrier`: the owner's lock
connections hold FLUSH TABLES WITH READ LOCK only between every part reporting ready and
every part reporting its snapshots open (cold: until every part finished). Each part
dumps its instance's shards into the set's prefix with its own connection slots, writes
its shards' progress and worker, and hands its shards' manifest entries back; the owner
writes the one manifest. A part that fails, dies (its heartbeat stops) or does not answer
the cut in time fails the set naming it; cancel and the owner's death reach every part.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from django.conf import settings
from django.db import connection
from django.db.models import Sum

from backups import queue
from backups.engine.barrier import CutFailed
from backups.engine.dump_part import OwnerCutThread
from backups.engine.errors import Cancelled, EngineError
from backups.engine.manifest import manifest_full_from_shards, manifest_write
from backups.engine.types import (
    BackupResult,
    BackupSpec,
    ChunkResult,
    ShardResult,
    TableResult,
)
from backups.models import BackupSet, ShardBackup, TableBackup
from backups.services.backup_parts import part_slot_holder
from backups.services.cold_locks import cold_lock_sessions_record
from backups.services.connection_slots import (
    ConnectionSlots,
    instance_needs,
    instance_slot_key,
)
from backups.services.parts import Part, PartFailed, PartsCancelled, parts_run
from backups.services.progress import JobTracker
from backups.services.sets import set_job_id

log = logging.getLogger(__name__)

PART_FUNCTION = "backups.services.backup_parts.backup_part_run"
# Owner's lock connection + a part's control connection + at least one dump connection.
LOCKED_MIN_CONNECTIONS = 3


class FanoutFailed(Exception):
    """The fanned-out set failed; `message` names the part, `shard_errors` per shard."""

    def __init__(self, message: str, *, shard_errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.shard_errors = shard_errors or {}


# ---------------------------------------------------------------------------- the plan


def _instances(shard_backups) -> dict[str, object]:
    """Instance name -> Instance, in shard order."""
    instances: dict[str, object] = {}
    for sb in shard_backups:
        instances.setdefault(sb.shard.instance.name, sb.shard.instance)
    return instances


def fanout_planned(*, backup_set: BackupSet, shard_backups) -> bool:
    """Whether this full logical set runs as one part per instance (settings.BACKUP_FANOUT):
    "off" never; "always" whenever the instances' connection caps allow it; "auto" when
    also the cluster has several instances and another worker waits on `backups` (or the
    owner may not run parts itself). Otherwise the set runs in the owner's process."""
    mode = str(settings.BACKUP_FANOUT).lower()
    if mode == "off" or backup_set.method != BackupSet.Method.LOGICAL:
        return False
    instances = _instances(shard_backups)
    if backup_set.consistency != BackupSet.Consistency.LOCKFREE and any(
        i.max_connections < LOCKED_MIN_CONNECTIONS for i in instances.values()
    ):
        return False  # the owner's lock connection and a part's two would not fit
    try:
        queue.redis_connection(queue.BACKUPS).ping()
    except Exception:  # noqa: BLE001 - no Redis: no parts, no barrier; run in one process
        return False
    if mode == "always":
        return True
    if len(instances) < 2:
        return False
    if not settings.BACKUP_FANOUT_LOCAL_PARTS:
        return True
    return queue.idle_workers(queue.BACKUPS) > 0


def fanout_owner_slots(*, backup_set: BackupSet, shard_backups) -> ConnectionSlots | None:
    """The owner's own slots: its one lock connection per instance (locked, cold); none
    for lockfree, where the owner connects to nothing."""
    if backup_set.consistency == BackupSet.Consistency.LOCKFREE:
        return None
    try:
        redis = queue.redis_connection(queue.BACKUPS)
    except Exception:  # noqa: BLE001
        return None
    needs, _names = instance_needs(_instances(shard_backups).values(), minimum=1)
    ttl = max(30, settings.JOB_HEARTBEAT_STALE_SECONDS * 2)
    return ConnectionSlots(redis, needs, holder=set_job_id(backup_set.pk), ttl=ttl)


# ---------------------------------------------------------------------------- the owner


def backup_fanout_run(
    *, backup_set: BackupSet, spec: BackupSpec, storage, tracker: JobTracker
) -> BackupResult:
    """Run the parts of `backup_set` and write its manifest; returns the set's result.

    Raises FanoutFailed (naming the part) or Cancelled. Whatever happens, the owner's lock
    connections are released before it returns; the caller's failure transition deletes
    the set's objects.
    """
    created_at = datetime.now(UTC)
    instances: list[str] = []
    for shard in spec.shards:
        if shard.instance not in instances:
            instances.append(shard.instance)
    locked = spec.consistency in ("locked", "cold")
    owner = set_job_id(backup_set.pk)
    cut: dict[str, OwnerCutThread] = {}
    progress = _SetProgress(backup_set)

    def start_cut(handle) -> None:
        if not locked:
            return
        thread = OwnerCutThread(
            spec,
            handle.redis,
            handle.key,
            instances,
            ready_timeout=float(settings.PARTS_CLAIM_AFTER_SECONDS)
            + float(settings.BACKUP_FANOUT_READY_SECONDS),
            progress=_LockEvents(backup_set.pk, tracker),
            should_stop=tracker.should_cancel,
            on_failure=lambda exc: handle.abort(f"the cut failed: {exc}"),
        )
        cut["thread"] = thread
        thread.start()

    def should_cancel() -> bool:
        progress.pull()
        thread = cut.get("thread")
        return tracker.should_cancel() or (thread is not None and thread.failure is not None)

    def record_worker(outcome) -> None:
        if outcome.worker:
            ShardBackup.objects.filter(
                backup_set_id=backup_set.pk, instance_name=outcome.name
            ).update(worker=outcome.worker[:255])

    tracker.say(
        f"dumping {len(instances)} part{'s' if len(instances) != 1 else ''} "
        "(one per instance) on the backup workers",
        flush=False,
    )
    try:
        outcomes = parts_run(
            owner=owner,
            parts=[Part(name, (backup_set.pk, name)) for name in instances],
            function=PART_FUNCTION,
            queue_name=queue.BACKUPS,
            should_cancel=should_cancel,
            run_untaken=bool(settings.BACKUP_FANOUT_LOCAL_PARTS),
            on_start=start_cut,
            on_outcome=record_worker,
        )
    except (PartsCancelled, PartFailed) as exc:
        _free_dead_parts_slots(backup_set, exc.outcomes)
        if tracker.should_cancel():
            raise Cancelled("backup cancelled") from None
        thread = cut.get("thread")
        if thread is not None and thread.failure is not None:
            # The root cause (it names the part): the others were only told to stop.
            raise FanoutFailed(_cut_message(thread.failure)) from None
        if isinstance(exc, PartFailed):
            raise FanoutFailed(f"part {exc.part} failed{_on(exc.worker)}: {exc.message}") from None
        raise Cancelled("backup cancelled") from None
    finally:
        thread = cut.get("thread")
        if thread is not None:
            thread.stop()
            thread.join(timeout=30)
        progress.pull(force=True)
    thread = cut.get("thread")
    if thread is not None and thread.failure is not None:
        raise FanoutFailed(_cut_message(thread.failure))
    if tracker.should_cancel():  # asked while the last part finished: no manifest
        raise Cancelled("backup cancelled")
    return _owner_result(spec, storage, outcomes, thread, created_at)


def _free_dead_parts_slots(backup_set: BackupSet, outcomes) -> None:
    """A part whose worker died (SIGKILL) cannot release its connection slots; they would
    hold its instance for a whole slot TTL. Its connections died with it, so free them."""
    dead = [o.name for o in outcomes.values() if "stopped beating" in (o.error or "")]
    if not dead:
        return
    try:
        redis = queue.redis_connection(queue.BACKUPS)
        for instance in backup_set.cluster.instances.filter(name__in=dead):
            holder = part_slot_holder(backup_set.pk, instance.name)
            members = [f"{holder}:{j}" for j in range(1, instance.max_connections + 1)]
            redis.zrem(instance_slot_key(f"{instance.host}:{instance.port}"), *members)
    except Exception:  # noqa: BLE001 - they expire on their own
        log.warning("could not free the slots of dead parts of set %s", backup_set.pk)


def _on(worker: str) -> str:
    return f" on {worker}" if worker else ""


def _cut_message(failure: BaseException) -> str:
    if isinstance(failure, CutFailed):
        return f"the consistent cut failed: {failure}"
    return str(failure)  # a cold lock lost mid-dump, an instance the owner cannot reach


def _owner_result(
    spec: BackupSpec, storage, outcomes, thread, created_at: datetime
) -> BackupResult:
    """The manifest from every part's shards, and the set's result."""
    entries: dict[str, dict] = {}
    excluded: set[str] = set()
    for outcome in outcomes.values():
        part = outcome.result or {}
        if not part.get("ok"):
            raise FanoutFailed(
                f"part {outcome.name} failed{_on(outcome.worker)}: "
                f"{part.get('error') or outcome.error or 'no result'}",
                shard_errors=part.get("shard_errors") or {},
            )
        for entry in part["shards"]:
            entries[entry["name"]] = entry
        excluded.update(part.get("excluded") or [])
    shards_doc = [entries[shard.name] for shard in spec.shards]
    if thread is not None:
        consistent_at, lock_window_ms = thread.consistent_at, thread.lock_window_ms
    else:  # lockfree: each shard its own instant; the set's is the latest
        instants = [datetime.fromisoformat(e["snapshot_at"]) for e in shards_doc]
        consistent_at, lock_window_ms = (max(instants) if instants else None), None
    doc = manifest_full_from_shards(
        spec=spec,
        shards_doc=shards_doc,
        excluded=sorted(excluded),
        created_at=created_at,
        consistent_at=consistent_at,
        lock_window_ms=lock_window_ms,
    )
    try:
        stored = manifest_write(storage, spec.set_prefix, doc, spec.manifest_hmac_key)
    except EngineError as exc:
        raise FanoutFailed(str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise FanoutFailed(f"storage write failed for the manifest: {exc}") from None
    shards = [_shard_result(entry) for entry in shards_doc]
    tables = [t for s in shards for t in s.tables]
    return BackupResult(
        ok=True,
        shards=shards,
        lock_window_ms=lock_window_ms,
        consistent_at=consistent_at,
        manifest_key=stored.key,
        manifest_sha256=stored.sha256,
        rows=sum(t.rows for t in tables),
        raw_bytes=sum(t.raw_bytes for t in tables),
        stored_bytes=sum(t.stored_bytes for t in tables),
        excluded=sorted(excluded),
        notes=[n for o in outcomes.values() for n in (o.result or {}).get("notes", [])],
    )


def datetime_or_none(value):
    return datetime.fromisoformat(value) if value else None


def _shard_result(entry: dict) -> ShardResult:
    return ShardResult(
        name=entry["name"],
        instance=entry["instance"],
        database=entry["database"],
        binlog_file=entry["binlog_file"],
        binlog_pos=entry["binlog_pos"],
        gtid=entry["gtid"],
        snapshot_at=datetime_or_none(entry.get("snapshot_at")),
        tables=[
            TableResult(
                database=entry["database"],
                name=t["name"],
                engine=t["engine"],
                has_primary_key=t["has_primary_key"],
                rows=t["rows"],
                raw_bytes=t["raw_bytes"],
                stored_bytes=t["stored_bytes"],
                checksum=t["checksum"],
                chunks=[ChunkResult(**c) for c in t["chunks"]],
            )
            for t in entry["tables"]
        ],
    )


class _SetProgress:
    """The set's rows and bytes for its progress bar: the sum of its shards' rows, which
    the parts write, onto the set about once a second (the owner's tracker writes only the
    progress line and the heartbeat)."""

    def __init__(self, backup_set: BackupSet) -> None:
        self.set_id = backup_set.pk
        self.estimate = backup_set.rows_estimate  # the discovery's, raised by the engine's
        self.rows = 0
        self.bytes = 0
        self.pulled = 0.0

    def pull(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.pulled < 1.0:
            return
        self.pulled = now
        totals = ShardBackup.objects.filter(backup_set_id=self.set_id).aggregate(
            rows=Sum("rows_done"), nbytes=Sum("bytes_done")
        )
        rows, nbytes = totals["rows"] or 0, totals["nbytes"] or 0
        values = {}
        if rows > self.rows or nbytes > self.bytes:
            self.rows, self.bytes = max(rows, self.rows), max(nbytes, self.bytes)
            values.update(rows_done=self.rows, bytes_done=self.bytes)
        estimate = (
            TableBackup.objects.filter(shard_backup__backup_set_id=self.set_id).aggregate(
                rows=Sum("rows_estimate")
            )["rows"]
            or 0
        )
        if estimate > self.estimate:
            self.estimate = values["rows_estimate"] = estimate
        if values:
            BackupSet.objects.filter(pk=self.set_id).update(**values)


class _LockEvents:
    """The owner's cut thread's progress: events to the tracker; a cold lock's sessions onto
    the set at once (for `backup_cancel` to kill). Runs on the cut thread."""

    def __init__(self, set_id: int, tracker: JobTracker) -> None:
        self.set_id = set_id
        self.tracker = tracker
        self.recorded: dict[str, int] | None = None

    def __call__(self, event) -> None:
        if event.lock_sessions is not None and event.lock_sessions != self.recorded:
            try:
                cold_lock_sessions_record(set_id=self.set_id, sessions=event.lock_sessions)
                self.recorded = dict(event.lock_sessions)
            finally:
                connection.close()  # this thread's own connection; the thread ends soon
        self.tracker.progress(event)
