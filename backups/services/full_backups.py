"""Full backups: start, run (on a worker), cancel, and reap sets whose worker died.

State machine of a BackupSet here:

    pending -> running -> succeeded | failed | cancelled
    pending -> cancelled                     (cancelled before a worker took it)
    pending | running -> failed              (refused at start, preflight, or worker died)

Every transition locks the set row, writes an audit event in the same transaction,
and defers side effects (enqueueing, cancelling RQ jobs) to `transaction.on_commit`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone

from backups import queue
from backups.engine.errors import Cancelled, EngineError
from backups.models import BackupPolicy, BackupSet
from backups.services.connection_slots import SlotsUnavailable
from backups.services.errors import BackupError, BackupRefused
from backups.services.progress import JobTracker, worker_name
from backups.services.sets import (
    HOUSEKEEPING_ACTOR,
    WORKER_ACTOR,
    backup_authorise,
    backup_set_finish_cancelled,
    backup_set_finish_failed,
    backup_set_finish_succeeded,
    backup_set_record,
    busy_reason,
    lock_set,
    set_storage,
)
from backups.status import PartStatus, SetStatus
from console.audit import audit_record
from shards.models import Cluster, PhysicalTable

log = logging.getLogger(__name__)

# How long a job waits for free connection slots on its instances before failing.
SLOT_WAIT_SECONDS = 15 * 60


# ---------------------------------------------------------------------------- start


def backup_start(
    *,
    cluster: Cluster,
    actor,
    kind: str = "full",
    consistency: str = "locked",
    method: str = "logical",
    compression_level: int | None = None,
    encrypt: bool | None = None,
    enqueue: bool = True,
) -> BackupSet:
    """Record a new backup set of `cluster` and queue it on `backups` (job id `backup-<id>`).

    Refuses (BackupError, nothing recorded) bad options and users without operator/admin.
    When the cluster already has a pending or running set, records this request as a
    `failed` set saying so and raises BackupRefused carrying it. `actor` is a User or a
    system name such as "cli". Compression and encryption default to the cluster's policy.
    `consistency` is locked (warm), lockfree (hot) or cold; `method` logical or physical.
    """
    backup_authorise(actor)
    if kind == BackupSet.Kind.INCREMENTAL:
        from backups.services.incrementals import incremental_start

        return incremental_start(cluster=cluster, actor=actor, enqueue=enqueue)
    if kind != BackupSet.Kind.FULL:
        raise BackupError(f"unknown backup kind '{kind}': choose full or incremental")
    if consistency not in BackupSet.Consistency.values:
        raise BackupError(f"unknown consistency '{consistency}': choose locked, lockfree or cold")
    if method not in BackupSet.Method.values:
        raise BackupError(f"unknown method '{method}': choose logical or physical")
    if method == BackupSet.Method.PHYSICAL and consistency == BackupSet.Consistency.COLD:
        raise BackupError(
            "cold applies to logical backups (the global read lock held for the whole dump); "
            "a physical backup takes only mariabackup's brief lock: choose --consistency "
            "locked or lockfree with --method physical"
        )
    policy = BackupPolicy.objects.filter(cluster=cluster).first()
    if compression_level is None:
        compression_level = (
            policy.compression_level if policy else settings.BACKUP_COMPRESSION_LEVEL
        )
    if not 1 <= int(compression_level) <= 22:
        raise BackupError("the compression level must be between 1 and 22")
    if encrypt is None:
        encrypt = bool(policy and policy.encrypt)

    backups_reap_stale()
    with transaction.atomic():
        # Serialises concurrent starts of one cluster: the second waits here, then sees the first.
        cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
        shards = list(cluster.shards.select_related("instance").order_by("name"))
        refused = busy_reason(cluster)
        if not refused and not shards:
            raise BackupError(f"cluster {cluster.name} has no shards to back up")
        estimates = _table_estimates(shards)
        backup_set = backup_set_record(
            cluster=cluster,
            shards=shards,
            actor=actor,
            refused=refused,
            enqueue=enqueue,
            shard_fields=lambda shard: {"rows_estimate": estimates.get(shard.pk, 0)},
            details={
                "consistency": consistency,
                "method": method,
                "compression_level": int(compression_level),
                "encrypted": bool(encrypt),
            },
            kind=BackupSet.Kind.FULL,
            consistency=consistency,
            method=method,
            compression_level=int(compression_level),
            encrypted=bool(encrypt),
            rows_estimate=sum(estimates.values()),
        )
    if refused:
        raise BackupRefused(refused, backup_set)
    return backup_set


def _table_estimates(shards) -> dict[int, int]:
    """Rows per shard from the latest discovery (0 when never discovered)."""
    totals: dict[int, int] = {}
    for shard_id, rows in PhysicalTable.objects.filter(shard__in=shards).values_list(
        "shard_id", "rows_estimate"
    ):
        totals[shard_id] = totals.get(shard_id, 0) + max(rows, 0)
    return totals


# ---------------------------------------------------------------------------- cancel


def backup_cancel(*, backup_set: BackupSet, actor) -> BackupSet:
    """Cancel a set: pending becomes `cancelled` at once (and its queued job is dropped);
    running gets `cancel_requested`, and its job stops within seconds and marks it `cancelled`.
    A running cold set's global read lock is released as the cancel commits (its lock
    connections are killed), not when the worker notices.
    Refuses sets that already ended, and users without operator/admin."""
    backup_authorise(actor)
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status == SetStatus.PENDING:
            now = timezone.now()
            locked.status = SetStatus.CANCELLED
            locked.cancel_requested = True
            locked.finished_at = now
            locked.error = f"cancelled by {_actor_name(actor)} before it started"
            locked.progress_text = "cancelled"
            locked.save()
            locked.shard_backups.update(status=PartStatus.CANCELLED)
            audit_record(
                actor=actor, action="backup.cancel", obj=locked, details={"was": "pending"}
            )
            job_id = locked.job_id
            transaction.on_commit(lambda: queue.cancel(job_id, queue=queue.BACKUPS))
        elif locked.status == SetStatus.RUNNING:
            if not locked.cancel_requested:
                locked.cancel_requested = True
                locked.progress_text = "cancelling…"
                locked.save(update_fields=["cancel_requested", "progress_text"])
                audit_record(actor=actor, action="backup.cancel_request", obj=locked, details={})
                if locked.consistency == BackupSet.Consistency.COLD:
                    from backups.services.cold_locks import cold_lock_kill

                    transaction.on_commit(lambda: cold_lock_kill(backup_set=locked))
        else:
            raise BackupError(f"set {locked.pk} already ended ({locked.status})")
    return locked


def _actor_name(actor) -> str:
    return actor.get_username() if hasattr(actor, "get_username") else str(actor)


# ---------------------------------------------------------------------------- run


def backup_execute(*, backup_set: BackupSet, runner_job_id: str = "") -> BackupSet:
    """Run one pending set to its end (called by the `backups` job, or in-process by `--wait`).

    Idempotent: only a `pending` set is run; any other state is returned unchanged. Holds
    per-instance connection slots (Instance.max_connections across all workers), checks every
    shard is reachable before locking anything, runs the engine with a heartbeat and progress
    written about once a second, honours cancel within seconds, and persists the result.
    `succeeded` only when the engine says every object and the manifest were stored and
    checked; otherwise `failed` with per-shard reasons, and the set's objects are deleted.
    """
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        rerun_after_death = (
            locked.status == SetStatus.RUNNING and runner_job_id and locked.job_id == runner_job_id
        )
        if locked.status != SetStatus.PENDING and not rerun_after_death:
            return locked
    if rerun_after_death:
        # RQ runs one job id once at a time: finding our own set still running means the
        # previous execution of this very job died (its work horse was killed) mid-run.
        return backup_set_finish_failed(
            locked,
            "the worker running this backup stopped (killed or crashed) at "
            f"{timezone.now():%Y-%m-%d %H:%M:%S} UTC: RQ re-ran its job after the work horse "
            "died; the set is incomplete and not usable",
            actor=HOUSEKEEPING_ACTOR,
        )
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status != SetStatus.PENDING:
            return locked
        now = timezone.now()
        if not runner_job_id:
            # Run in-process (`backup --wait` without a worker): a late worker taking the
            # queued job must see that someone else runs this set.
            locked.job_id = f"local:{socket.gethostname()}:{os.getpid()}"
        locked.status = SetStatus.RUNNING
        locked.started_at = now
        locked.heartbeat_at = now
        locked.progress_text = "starting"
        locked.save()
        locked.shard_backups.update(status=PartStatus.RUNNING, started_at=now, worker=worker_name())
        audit_record(actor=WORKER_ACTOR, action="backup.run", obj=locked, details={})
    backup_set = locked

    state: dict[str, Any] = {}
    try:
        try:
            result = _execute_engine(backup_set, state)
        finally:
            # The tracker's last write comes before the finish transition's progress line.
            tracker = state.get("tracker")
            if tracker is not None:
                tracker.stop()
            slots = state.get("slots")
            if slots is not None:
                slots.release()
    except _Outcome as outcome:
        if outcome.cancelled:
            return backup_set_finish_cancelled(backup_set)
        return backup_set_finish_failed(
            backup_set, outcome.message, shard_errors=outcome.shard_errors
        )
    except Exception as exc:
        log.exception("backup set %s failed unexpectedly", backup_set.pk)
        backup_set_finish_failed(backup_set, f"internal error: {exc.__class__.__name__}: {exc}")
        raise
    if not result.ok and BackupSet.objects.filter(pk=backup_set.pk, cancel_requested=True).exists():
        # A cancelled cold set may fail on its killed lock connection before it sees the cancel.
        return backup_set_finish_cancelled(backup_set)
    if not result.ok:
        shard_errors = {s.name: s.error for s in result.shards if s.error}
        message = result.error or "; ".join(f"{k}: {v}" for k, v in shard_errors.items())
        return backup_set_finish_failed(
            backup_set, message or "the engine reported a failure", shard_errors=shard_errors
        )
    if result.excluded:
        # What the policy's exclude_tables kept out, as the manifest lists it (set page, show).
        BackupSet.objects.filter(pk=backup_set.pk, status=SetStatus.RUNNING).update(
            excluded_tables=list(result.excluded)
        )
    return backup_set_finish_succeeded(backup_set, result, on_commit=_after_success)


def _after_success(backup_set: BackupSet) -> None:
    """Queue the storage check of a new set when the cluster's policy asks for it."""
    from backups.services.verification import verification_after_backup

    try:
        verification_after_backup(backup_set)
    except Exception:  # noqa: BLE001 - housekeeping verifies never-verified sets later
        log.exception("queueing the verification of set %s failed", backup_set.pk)


def _execute_engine(backup_set: BackupSet, state: dict):
    """Slots, tracker, preflight, engine; records what it started in `state` for cleanup."""
    # The engine's modules load on first use: `manage.py backup` starts without them (workers
    # preload them, see backups.queue.JOB_MODULES).
    from backups.services.backup_parts import SetPartRows
    from backups.services.backup_spec import (
        PreflightRefused,
        backup_connection_slots,
        backup_spec_build,
    )
    from backups.services.fanout import fanout_owner_slots, fanout_planned

    try:
        storage = set_storage(backup_set)
    except EngineError as exc:  # a misconfigured storage URL: one sentence on the set
        raise _Outcome(f"backup could not start: {exc}") from None
    shard_backups = list(
        backup_set.shard_backups.select_related("shard__instance").order_by("shard_name")
    )
    fanout = fanout_planned(backup_set=backup_set, shard_backups=shard_backups)
    try:
        slots = state["slots"] = (
            fanout_owner_slots(backup_set=backup_set, shard_backups=shard_backups)
            if fanout
            else backup_connection_slots(backup_set=backup_set, shard_backups=shard_backups)
        )
    except SlotsUnavailable as exc:
        raise _Outcome(f"backup could not start: {exc}") from None
    tracker = state["tracker"] = JobTracker(
        BackupSet,
        backup_set.pk,
        on_flush=None if fanout else SetPartRows(backup_set),
        slots=slots,
        # Fanned out, the parts write the rows; the owner its progress line and heartbeat.
        columns=("progress_text", "heartbeat_at") if fanout else None,
    )
    tracker.start()
    if slots is not None:
        tracker.say("waiting for free connection slots on the instances", flush=False)
        try:
            slots.acquire(wait=SLOT_WAIT_SECONDS, should_cancel=tracker.should_cancel)
        except SlotsUnavailable as exc:
            if tracker.should_cancel():
                raise _Outcome(cancelled=True) from None
            raise _Outcome(f"backup could not start: {exc}") from None
    if tracker.should_cancel():
        raise _Outcome(cancelled=True)
    try:
        spec = backup_spec_build(backup_set=backup_set, shard_backups=shard_backups, slots=slots)
    except PreflightRefused as exc:
        raise _Outcome(exc.message, shard_errors=exc.shard_errors) from None
    except EngineError as exc:  # the master key cannot open the set's key or sign its manifest
        raise _Outcome(f"backup could not start: {exc}") from None
    if backup_set.method == BackupSet.Method.PHYSICAL:
        return _run_physical(spec, shard_backups, storage, tracker)
    if fanout:
        return _run_fanout(backup_set, spec, storage, tracker)
    return _run_engine(spec, storage, tracker)


def _run_fanout(backup_set, spec, storage, tracker: JobTracker):
    """One part per instance on the `backups` workers (backups/services/fanout.py)."""
    from backups.services.fanout import FanoutFailed, backup_fanout_run

    try:
        return backup_fanout_run(backup_set=backup_set, spec=spec, storage=storage, tracker=tracker)
    except Cancelled:
        raise _Outcome(cancelled=True) from None
    except FanoutFailed as exc:
        if BackupSet.objects.filter(pk=backup_set.pk, cancel_requested=True).exists():
            # A cancelled cold set's killed lock connections may fail it before it sees
            # the cancel.
            raise _Outcome(cancelled=True) from None
        raise _Outcome(exc.message, shard_errors=exc.shard_errors) from None


def _run_physical(spec, shard_backups, storage, tracker: JobTracker):
    """The physical branch: mariabackup per instance (backups/services/physical.py)."""
    from backups.services.backup_spec import PreflightRefused
    from backups.services.physical import physical_backup_run, physical_part_worker_record

    datadirs = {sb.shard.instance.name: sb.shard.instance.datadir for sb in shard_backups}
    agents = {sb.shard.instance.name: sb.shard.instance.agent_queue for sb in shard_backups}
    tracker.say("copying data files with mariabackup", flush=False)
    try:
        return physical_backup_run(
            spec=spec,
            datadirs=datadirs,
            storage=storage,
            progress=tracker.progress,
            should_cancel=tracker.should_cancel,
            agent_queues=agents,
            on_part=lambda instance, worker: physical_part_worker_record(
                set_id=spec.set_id, instance=instance, worker=worker
            ),
        )
    except PreflightRefused as exc:
        raise _Outcome(exc.message, shard_errors=exc.shard_errors) from None
    except Cancelled:
        raise _Outcome(cancelled=True) from None
    except EngineError as exc:
        raise _Outcome(str(exc)) from None


class _Outcome(Exception):
    def __init__(self, message="", *, cancelled=False, shard_errors=None):
        super().__init__(message)
        self.message = message
        self.cancelled = cancelled
        self.shard_errors = shard_errors or {}


def _run_engine(spec, storage, tracker: JobTracker):
    from backups.engine.dump import dump_cluster

    try:
        return dump_cluster(
            spec,
            storage,
            progress=_LockSessions(spec.set_id, tracker),
            should_cancel=tracker.should_cancel,
        )
    except Cancelled:
        raise _Outcome(cancelled=True) from None
    except EngineError as exc:
        raise _Outcome(str(exc)) from None
    except Exception:
        if tracker.should_cancel():
            raise _Outcome(cancelled=True) from None
        raise


class _LockSessions:
    """The engine's progress sink: events go to the tracker; the connections holding a cold
    set's global read lock go onto the set at once (for `backup_cancel` to kill)."""

    def __init__(self, set_id: int, tracker: JobTracker) -> None:
        self.set_id = set_id
        self.tracker = tracker
        self.recorded: dict[str, int] | None = None

    def __call__(self, event) -> None:
        if event.lock_sessions is not None and event.lock_sessions != self.recorded:
            from backups.services.cold_locks import cold_lock_sessions_record

            cold_lock_sessions_record(set_id=self.set_id, sessions=event.lock_sessions)
            self.recorded = dict(event.lock_sessions)
        self.tracker.progress(event)


# ---------------------------------------------------------------------------- crashed workers


def backup_fail_from_job_failure(*, set_id: int, reason: str) -> BackupSet | None:
    """RQ says the job failed (exception, killed work horse, or abandoned): fail the set."""
    backup_set = BackupSet.objects.filter(pk=set_id).first()
    if backup_set is None or backup_set.status not in SetStatus.ACTIVE:
        return backup_set
    return backup_set_finish_failed(
        backup_set,
        f"the worker running this backup stopped: {reason}",
        only_if=SetStatus.ACTIVE,
    )


def backups_reap_stale(*, now: datetime | None = None) -> list[BackupSet]:
    """Fail sets whose worker died: `running` with no heartbeat for
    JOB_HEARTBEAT_STALE_SECONDS, or `pending` whose job RQ lost or failed. Never succeeds a set.

    Cheap when nothing is active (one indexed query); safe to call from pages and commands.
    """
    now = now or timezone.now()
    stale = timedelta(seconds=settings.JOB_HEARTBEAT_STALE_SECONDS)
    reaped = []
    # Incrementals write the same heartbeat, so one reaper serves both kinds.
    candidates = list(BackupSet.objects.filter(status__in=SetStatus.ACTIVE))
    for backup_set in candidates:
        reason = _death_reason(backup_set, now, stale)
        if reason:
            reaped.append(
                backup_set_finish_failed(
                    backup_set, reason, actor=HOUSEKEEPING_ACTOR, only_if=SetStatus.ACTIVE
                )
            )
    return reaped


def _death_reason(backup_set: BackupSet, now: datetime, stale: timedelta) -> str:
    if backup_set.status == SetStatus.RUNNING:
        last = backup_set.heartbeat_at or backup_set.started_at or backup_set.created_at
        if now - last > stale:
            return (
                "the worker running this backup stopped (killed or crashed) at "
                f"{last:%Y-%m-%d %H:%M:%S} UTC: no heartbeat for "
                f"{int((now - last).total_seconds())} s; the set is incomplete and not usable"
            )
        # A killed work horse under a live worker: RQ has already marked the job failed.
        # ("canceled" is how `backup --wait` takes a job over to run it in-process.)
        status = (
            queue.job_status(backup_set.job_id, queue=queue.BACKUPS)
            if backup_set.job_id
            else "unknown"
        )
        if status in ("failed", "stopped"):
            return (
                "the worker running this backup stopped (killed or crashed) at "
                f"{now:%Y-%m-%d %H:%M:%S} UTC: RQ reports its job {status}; "
                "the set is incomplete and not usable"
            )
        return ""
    # pending: only when RQ no longer has a live job for it.
    if now - backup_set.created_at <= stale:
        return ""
    status = queue.job_status(backup_set.job_id, queue=queue.BACKUPS)
    if status in ("queued", "scheduled", "deferred", "started", "unknown"):
        return ""
    if status == "missing":
        return (
            "its queued job was lost (Redis was flushed or the job expired) before a worker took it"
        )
    return f"its job ended as '{status}' before the backup started"


def backup_run_in_process_if_unclaimed(
    *, backup_set: BackupSet, grace_seconds: float = 3.0
) -> BackupSet:
    """For `backup --wait` without a worker: if no worker took the job within the grace
    period, drop it from the queue and run the set in this process. The pending -> running
    transition decides who runs it, so a late worker simply finds it already running."""
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        backup_set.refresh_from_db(fields=["status"])
        if backup_set.status != SetStatus.PENDING:
            return backup_set
        time.sleep(0.2)
    queue.cancel(backup_set.job_id, queue=queue.BACKUPS)
    close_old_connections()
    if backup_set.kind == BackupSet.Kind.INCREMENTAL:
        from backups.services.incrementals import incremental_execute

        return incremental_execute(backup_set=backup_set)
    return backup_execute(backup_set=backup_set)
