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
from backups.engine.barrier import CutFailed, PartCut
from backups.engine.dump_part import OwnerCutThread, dump_part
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
from backups.services.backup_spec import (
    PreflightRefused,
    backup_connection_slots,
    backup_spec_build,
)
from backups.services.cold_locks import cold_lock_sessions_record
from backups.services.connection_slots import (
    ConnectionSlots,
    SlotNeed,
    SlotsUnavailable,
    instance_slot_key,
)
from backups.services.parts import Part, PartContext, PartFailed, PartsCancelled, parts_run
from backups.services.progress import JobTracker, ProgressSnapshot
from backups.services.sets import set_job_id, set_storage
from backups.status import PartStatus, SetStatus

log = logging.getLogger(__name__)

PART_FUNCTION = "backups.services.fanout.backup_part_run"
# How long a part waits for free connection slots on its instance before failing.
PART_SLOT_WAIT_SECONDS = 15 * 60
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
    needs = {}
    for instance in _instances(shard_backups).values():
        address = f"{instance.host}:{instance.port}"
        cap = min(needs[address].cap, instance.max_connections) if address in needs else None
        needs[address] = SlotNeed(cap=cap or instance.max_connections, minimum=1, wanted=1)
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


def part_slot_holder(set_id: int, instance: str) -> str:
    """Who holds a part's connection slots (the part's job id)."""
    return f"{set_job_id(set_id)}-part-{instance}"


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


# ---------------------------------------------------------------------------- a part


def backup_part_run(ctx: PartContext, set_id: int, instance_name: str) -> dict:
    """One part (every shard of one instance) of a running fanned-out set, on whichever
    worker claimed it; returns `PartDump.as_dict()` for the owner.

    Refused (EngineError) when the set is no longer running. Takes the instance's
    connection slots, writes its shards' worker and progress, stops within about a second
    of a cancel, of the set ending, of the owner aborting or dying; on any failure its own
    objects are removed and its shards carry the reason.
    """
    backup_set = BackupSet.objects.select_related("cluster").get(pk=set_id)
    if backup_set.status != SetStatus.RUNNING or backup_set.cancel_requested:
        raise EngineError(f"set {set_id} is {backup_set.status}; its part is not needed")
    shard_backups = list(
        backup_set.shard_backups.select_related("shard__instance")
        .filter(instance_name=instance_name)
        .order_by("shard_name")
    )
    if not shard_backups:
        raise EngineError(f"set {set_id} has no shard on instance {instance_name}")
    ShardBackup.objects.filter(pk__in=[sb.pk for sb in shard_backups]).update(
        worker=ctx.worker[:255], status=PartStatus.RUNNING
    )
    cut = None
    if backup_set.consistency in (BackupSet.Consistency.LOCKED, BackupSet.Consistency.COLD):
        cut = PartCut(ctx.redis, ctx.key, instance_name)
    slots = backup_connection_slots(
        backup_set=backup_set,
        shard_backups=shard_backups,
        holder=part_slot_holder(set_id, instance_name),
    )
    # A part's progress line (a throttle pause, the table it dumps) becomes the set's; not
    # while a cold set's owner says each second how long it has held the lock.
    cold = backup_set.consistency == BackupSet.Consistency.COLD
    tracker = JobTracker(
        BackupSet,
        set_id,
        on_flush=SetPartRows(backup_set, set_estimate=False),
        slots=slots,
        columns=() if cold else ("progress_text",),
    )
    ended = _SetEnded(set_id)

    def should_stop() -> bool:
        return tracker.should_cancel() or ctx.aborted() or ended()

    tracker.start()
    try:
        try:
            if slots is not None:
                slots.acquire(wait=PART_SLOT_WAIT_SECONDS, should_cancel=should_stop)
            if should_stop():
                raise Cancelled("backup cancelled")
            spec = backup_spec_build(
                backup_set=backup_set, shard_backups=shard_backups, slots=slots
            )
        except (SlotsUnavailable, PreflightRefused, EngineError) as exc:
            message = getattr(exc, "message", "") or str(exc)
            _shard_errors(shard_backups, getattr(exc, "shard_errors", {}))
            if cut is not None:
                cut.fail(message)
            raise EngineError(message) from None
        except Cancelled:
            if cut is not None:
                cut.fail("cancelled")
            raise
        part = dump_part(
            spec,
            set_storage(backup_set),
            cut=cut,
            progress=tracker.progress,
            should_cancel=should_stop,
        )
    finally:
        tracker.stop()
        if slots is not None:
            slots.release()
    if not part.ok:
        _shard_errors(shard_backups, part.shard_errors)
        raise EngineError(part.error or "the part failed")
    return part.as_dict()


def _shard_errors(shard_backups, errors: dict[str, str]) -> None:
    for sb in shard_backups:
        if errors.get(sb.shard_name):
            ShardBackup.objects.filter(pk=sb.pk).update(error=errors[sb.shard_name][:2000])


class _SetEnded:
    """True once the set is no longer running (failed, reaped, cancelled): read at most
    once a second, so a part of a failed set stops writing into its deleted prefix."""

    def __init__(self, set_id: int) -> None:
        self.set_id = set_id
        self.checked = 0.0
        self.ended = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.ended and now - self.checked >= 1.0:
            self.checked = now
            status = (
                BackupSet.objects.filter(pk=self.set_id).values_list("status", flat=True).first()
            )
            self.ended = status != SetStatus.RUNNING
        return self.ended


class SetPartRows:
    """A tracker's `on_flush`: each shard's and table's progress onto its own row, and the
    engine's row estimate onto the set when it exceeds the discovery's."""

    def __init__(self, backup_set: BackupSet, *, set_estimate: bool = True) -> None:
        self.set_id = backup_set.pk
        self.set_estimate = set_estimate  # a part sees only its shards: the owner sums them
        self.discovery_estimate = backup_set.rows_estimate
        self.table_ids: dict[tuple[str, str], int] = {}
        parts = ShardBackup.objects.filter(backup_set_id=self.set_id)
        self.shard_ids = dict(parts.values_list("shard_name", "id"))
        self.databases = dict(parts.values_list("shard_name", "database"))

    def __call__(self, snapshot: ProgressSnapshot) -> None:
        # Only the rows that moved since the last flush: a finished table is not rewritten
        # every second while the rest of a large cluster is dumped.
        for shard_name in snapshot.changed_shards:
            rows, nbytes = snapshot.shards[shard_name]
            ShardBackup.objects.filter(pk=self.shard_ids.get(shard_name)).update(
                rows_done=rows, bytes_done=nbytes, status=PartStatus.RUNNING
            )
        for key in snapshot.changed_tables:
            rows, nbytes, estimate = snapshot.tables[key]
            self._table(*key, rows, nbytes, estimate)
        engine_estimate = sum(t[2] for t in snapshot.tables.values())
        if self.set_estimate and engine_estimate > self.discovery_estimate:
            BackupSet.objects.filter(pk=self.set_id).update(rows_estimate=engine_estimate)
            self.discovery_estimate = engine_estimate  # written again only when it grows

    def _table(self, shard_name, table, rows, nbytes, estimate) -> None:
        shard_backup_id = self.shard_ids.get(shard_name)
        if shard_backup_id is None:
            return
        table_id = self.table_ids.get((shard_name, table))
        values = {"rows": rows, "raw_bytes": nbytes}
        if estimate:
            values["rows_estimate"] = estimate
        if table_id is None:
            obj, _ = TableBackup.objects.update_or_create(
                shard_backup_id=shard_backup_id,
                name=table,
                defaults={
                    **values,
                    "database": self.databases.get(shard_name, ""),
                    "status": PartStatus.RUNNING,
                },
            )
            self.table_ids[(shard_name, table)] = obj.pk
        else:
            TableBackup.objects.filter(pk=table_id).update(**values)
