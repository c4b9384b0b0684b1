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
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from backups.models import BackupPolicy, BackupSet, Chunk, ShardBackup, TableBackup
from backups.services.errors import BackupError, BackupRefused
from console.audit import audit_record
from console.roles import ADMIN, OPERATOR, require_role
from shards.models import Cluster, PhysicalTable

log = logging.getLogger(__name__)

QUEUE = "backups"
HOUSEKEEPING_QUEUE = "default"
HOUSEKEEPING_GATE_KEY = "shardvault:backups-housekeeping-scheduled"
WORKER_ACTOR = "worker"
HOUSEKEEPING_ACTOR = "housekeeping"
# How long a job waits for free connection slots on its instances before failing.
SLOT_WAIT_SECONDS = 15 * 60

ACTIVE = (BackupSet.Status.PENDING, BackupSet.Status.RUNNING)
FINISHED = (BackupSet.Status.SUCCEEDED, BackupSet.Status.FAILED, BackupSet.Status.CANCELLED)


def job_id_for(set_id: int) -> str:
    return f"backup-{set_id}"


def _actor_user(actor):
    return actor if hasattr(actor, "pk") else None


def _authorise(actor) -> None:
    """Users need operator or admin; a plain string is a system actor (cli, scheduler)."""
    if hasattr(actor, "pk"):
        require_role(actor, OPERATOR, ADMIN, action="run backups")
    elif not isinstance(actor, str) or not actor:
        raise BackupError("a backup needs an actor (a user or a system name)")


# ---------------------------------------------------------------------------- start


def backup_start(
    *,
    cluster: Cluster,
    actor,
    kind: str = "full",
    consistency: str = "locked",
    compression_level: int | None = None,
    encrypt: bool | None = None,
    enqueue: bool = True,
) -> BackupSet:
    """Record a new backup set of `cluster` and queue it on `backups` (job id `backup-<id>`).

    Refuses (BackupError, nothing recorded) bad options and users without operator/admin.
    When the cluster already has a pending or running set, records this request as a
    `failed` set saying so and raises BackupRefused carrying it. `actor` is a User or a
    system name such as "cli". Compression and encryption default to the cluster's policy.
    """
    _authorise(actor)
    if kind == BackupSet.Kind.INCREMENTAL:
        from backups.services.incrementals import incremental_start

        return incremental_start(cluster=cluster, actor=actor, enqueue=enqueue)
    if kind != BackupSet.Kind.FULL:
        raise BackupError(f"unknown backup kind '{kind}': choose full or incremental")
    if consistency not in BackupSet.Consistency.values:
        raise BackupError(f"unknown consistency '{consistency}': choose locked or lockfree")
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
                "compression_level": int(compression_level),
                "encrypted": bool(encrypt),
            },
            kind=BackupSet.Kind.FULL,
            consistency=consistency,
            compression_level=int(compression_level),
            encrypted=bool(encrypt),
            rows_estimate=sum(estimates.values()),
        )
    if refused:
        raise BackupRefused(refused, backup_set)
    return backup_set


def busy_reason(cluster: Cluster) -> str:
    """Why a new set of `cluster` cannot start now ("" when none is pending or running)."""
    active = BackupSet.objects.filter(cluster=cluster, status__in=ACTIVE).order_by("id").first()
    if active is None:
        return ""
    return (
        f"cluster {cluster.name} is already being backed up "
        f"(set {active.pk} is {active.status}); wait for it to finish or cancel it"
    )


def backup_set_record(
    *,
    cluster: Cluster,
    shards,
    actor,
    refused: str,
    enqueue: bool,
    shard_fields: Callable[[Any], dict],
    details: dict,
    **fields,
) -> BackupSet:
    """Record a new set (full or incremental) with one ShardBackup per shard, and its audit event.

    Call inside the transaction holding the cluster's row lock. A `refused` set is recorded
    `failed` with that reason; otherwise `pending`, queued after commit when `enqueue`.
    `fields` are the set's own columns (kind, consistency, ...), `shard_fields(shard)` the
    extra columns of each shard's row.
    """
    backup_set = BackupSet.objects.create(
        cluster=cluster,
        storage_url=settings.STORAGE_URL,
        triggered_by=_actor_user(actor),
        status=BackupSet.Status.FAILED if refused else BackupSet.Status.PENDING,
        error=refused,
        **fields,
    )
    backup_set.object_prefix = f"{cluster.name}/{backup_set.pk}"
    backup_set.job_id = "" if refused else job_id_for(backup_set.pk)
    if refused:
        backup_set.finished_at = timezone.now()
    elif backup_set.encrypted:
        _wrap_new_data_key(backup_set)
    backup_set.save()
    ShardBackup.objects.bulk_create(
        ShardBackup(
            backup_set=backup_set,
            shard=shard,
            shard_name=shard.name,
            instance_name=shard.instance.name,
            database=shard.database,
            status=backup_set.status,
            **shard_fields(shard),
        )
        for shard in shards
    )
    audit_record(
        actor=actor,
        action="backup.refused" if refused else "backup.start",
        obj=backup_set,
        details={
            "cluster": cluster.name,
            "kind": backup_set.kind,
            **details,
            **({"error": refused} if refused else {}),
        },
    )
    if not refused and enqueue:
        set_id, kind = backup_set.pk, backup_set.kind
        transaction.on_commit(lambda: _enqueue_backup(set_id, kind))
    return backup_set


def _wrap_new_data_key(backup_set: BackupSet) -> None:
    """A new data key for `backup_set`, wrapped under the master key; BackupError if unusable."""
    from backups.engine import keys as crypto
    from backups.engine.errors import EngineError

    master = settings.SHARDVAULT_DATA_KEY
    try:
        backup_set.wrapped_key = crypto.wrap_data_key(crypto.new_data_key(), master)
        backup_set.key_id = crypto.master_key_id(master)
    except EngineError as exc:
        raise BackupError(f"the set cannot be encrypted: {exc}") from None


def _unwrap_data_key(backup_set: BackupSet) -> bytes | None:
    if not backup_set.encrypted:
        return None
    from backups.engine import keys as crypto

    return crypto.unwrap_data_key(backup_set.wrapped_key, settings.SHARDVAULT_DATA_KEY)


def _table_estimates(shards) -> dict[int, int]:
    """Rows per shard from the latest discovery (0 when never discovered)."""
    totals: dict[int, int] = {}
    for shard_id, rows in PhysicalTable.objects.filter(shard__in=shards).values_list(
        "shard_id", "rows_estimate"
    ):
        totals[shard_id] = totals.get(shard_id, 0) + max(rows, 0)
    return totals


def _enqueue_backup(set_id: int, kind: str) -> None:
    import django_rq
    from rq import Callback

    from backups.jobs.backups import run_backup_job, run_backup_job_failed
    from backups.jobs.incrementals import run_incremental_job

    incremental = kind == BackupSet.Kind.INCREMENTAL
    try:
        queue = django_rq.get_queue(QUEUE)
        queue.enqueue(
            run_incremental_job if incremental else run_backup_job,
            set_id,
            job_id=job_id_for(set_id),
            description=f"{'incremental ' if incremental else ''}backup set {set_id}",
            on_failure=Callback(run_backup_job_failed),
            result_ttl=7 * 24 * 3600,
            failure_ttl=30 * 24 * 3600,
        )
        housekeeping_ensure_scheduled()
    except Exception as exc:  # noqa: BLE001 - Redis down: say so on the set, never leave it pending
        log.exception("could not queue backup set %s", set_id)
        backup_set = BackupSet.objects.get(pk=set_id)
        _finish_failed(
            backup_set,
            f"the backup could not be queued: the job queue (Redis) is unreachable ({exc})",
            actor=HOUSEKEEPING_ACTOR,
            only_if=(BackupSet.Status.PENDING,),
        )


def housekeeping_ensure_scheduled() -> None:
    """Schedule the periodic reaper job on `default`, at most once per interval.

    A Redis key set with NX and an expiry of one interval gates it, so many starts
    schedule one job (it needs a worker running with --with-scheduler).
    """
    import django_rq

    from backups.jobs.backups import housekeeping_job
    from backups.jobs.restores import restore_housekeeping_schedule
    from backups.jobs.verification import verification_housekeeping_schedule

    verification_housekeeping_schedule()
    restore_housekeeping_schedule()
    interval = max(10, settings.JOB_HEARTBEAT_STALE_SECONDS)
    queue = django_rq.get_queue(HOUSEKEEPING_QUEUE)
    if not queue.connection.set(HOUSEKEEPING_GATE_KEY, "1", nx=True, ex=interval - 5):
        return
    queue.enqueue_in(
        timedelta(seconds=interval),
        housekeeping_job,
        description="fail backup sets whose worker died",
        result_ttl=600,
        failure_ttl=24 * 3600,
    )


# ---------------------------------------------------------------------------- cancel


def backup_cancel(*, backup_set: BackupSet, actor) -> BackupSet:
    """Cancel a set: pending becomes `cancelled` at once (and its queued job is dropped);
    running gets `cancel_requested`, and its job stops within seconds and marks it `cancelled`.
    Refuses sets that already ended, and users without operator/admin."""
    _authorise(actor)
    with transaction.atomic():
        locked = BackupSet.objects.select_for_update().get(pk=backup_set.pk)
        if locked.status == BackupSet.Status.PENDING:
            now = timezone.now()
            locked.status = BackupSet.Status.CANCELLED
            locked.cancel_requested = True
            locked.finished_at = now
            locked.error = f"cancelled by {_actor_name(actor)} before it started"
            locked.progress_text = "cancelled"
            locked.save()
            locked.shard_backups.update(status=BackupSet.Status.CANCELLED)
            audit_record(
                actor=actor, action="backup.cancel", obj=locked, details={"was": "pending"}
            )
            job_id = locked.job_id
            transaction.on_commit(lambda: _cancel_rq_job(job_id))
        elif locked.status == BackupSet.Status.RUNNING:
            if not locked.cancel_requested:
                locked.cancel_requested = True
                locked.progress_text = "cancelling…"
                locked.save(update_fields=["cancel_requested", "progress_text"])
                audit_record(actor=actor, action="backup.cancel_request", obj=locked, details={})
        else:
            raise BackupError(f"set {locked.pk} already ended ({locked.status})")
    return locked


def _actor_name(actor) -> str:
    return actor.get_username() if hasattr(actor, "get_username") else str(actor)


def _cancel_rq_job(job_id: str) -> None:
    if not job_id:
        return
    import django_rq
    from rq.job import Job

    try:
        conn = django_rq.get_connection(QUEUE)
        Job.fetch(job_id, connection=conn).cancel()
    except Exception:  # noqa: BLE001 - the job may be gone already; the set's state decides
        log.info("RQ job %s could not be cancelled (already gone?)", job_id)


# ---------------------------------------------------------------------------- run


class _Progress:
    """Aggregates engine progress events (from any engine thread) for the heartbeat to flush."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows = 0
        self.bytes = 0
        self.shards: dict[str, list[int]] = {}  # shard -> [rows, bytes]
        self.tables: dict[tuple[str, str], list[int]] = {}  # (shard, table) -> [rows, bytes, est]
        self.text = ""
        self.dirty = False

    def __call__(self, event) -> None:
        with self.lock:
            self.rows += event.rows_done
            self.bytes += event.bytes_done
            if event.shard:
                shard = self.shards.setdefault(event.shard, [0, 0])
                shard[0] += event.rows_done
                shard[1] += event.bytes_done
                if event.table:
                    table = self.tables.setdefault((event.shard, event.table), [0, 0, 0])
                    table[0] += event.rows_done
                    table[1] += event.bytes_done
                    if event.rows_estimate:
                        table[2] = event.rows_estimate
            if event.message or event.stage:
                where = ".".join(p for p in (event.shard, event.table) if p)
                self.text = " ".join(
                    p for p in (event.stage, where, event.message and f"— {event.message}") if p
                )[:300]
            self.dirty = True

    def snapshot(self):
        with self.lock:
            self.dirty = False
            return (
                self.rows,
                self.bytes,
                {k: list(v) for k, v in self.shards.items()},
                {k: list(v) for k, v in self.tables.items()},
                self.text,
            )


class _Heartbeat(threading.Thread):
    """Once a second: read `cancel_requested`, flush progress, and (every few seconds) beat.

    Runs beside the engine so the heartbeat never depends on the engine making progress
    (a long lock wait or a huge chunk must not look like a dead worker). It is the only
    thread writing progress, so writes stay about once a second whatever the engine does.
    """

    def __init__(self, backup_set: BackupSet, progress: _Progress, slots, on_progress) -> None:
        super().__init__(name=f"heartbeat-{backup_set.pk}", daemon=True)
        self.set_id = backup_set.pk
        self.progress = progress
        self.slots = slots
        self.on_progress = on_progress
        self.cancel = threading.Event()
        self.stopping = threading.Event()
        self.beat_every = max(1.0, settings.JOB_HEARTBEAT_STALE_SECONDS / 4)
        self.last_beat = 0.0
        self.table_ids: dict[tuple[str, str], int] = {}
        self.discovery_estimate = backup_set.rows_estimate
        self.shard_ids = dict(
            ShardBackup.objects.filter(backup_set_id=self.set_id).values_list("shard_name", "id")
        )
        self.databases = dict(
            ShardBackup.objects.filter(backup_set_id=self.set_id).values_list(
                "shard_name", "database"
            )
        )

    def run(self) -> None:
        try:
            while not self.stopping.wait(1.0):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - a missed beat is retried next second
                    log.exception("heartbeat of backup set %s failed", self.set_id)
        finally:
            connection.close()

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        fields: dict[str, Any] = {}
        if force or now - self.last_beat >= self.beat_every:
            fields["heartbeat_at"] = timezone.now()
            self.last_beat = now
            if self.slots is not None:
                self.slots.refresh()
        if self.progress.dirty or force:
            rows, nbytes, shards, tables, text = self.progress.snapshot()
            fields.update(rows_done=rows, bytes_done=nbytes)
            if text:
                fields["progress_text"] = text
            for shard_name, (srows, sbytes) in shards.items():
                ShardBackup.objects.filter(pk=self.shard_ids.get(shard_name)).update(
                    rows_done=srows, bytes_done=sbytes, status=BackupSet.Status.RUNNING
                )
            for (shard_name, table), (trows, tbytes, test) in tables.items():
                self._table_progress(shard_name, table, trows, tbytes, test)
            engine_estimate = sum(t[2] for t in tables.values())
            if engine_estimate > self.discovery_estimate:
                fields["rows_estimate"] = engine_estimate
            if self.on_progress:
                self.on_progress({"rows_done": rows, "bytes_done": nbytes, "text": text})
        if fields:
            BackupSet.objects.filter(pk=self.set_id).update(**fields)
        if BackupSet.objects.filter(pk=self.set_id, cancel_requested=True).exists():
            self.cancel.set()

    def _table_progress(self, shard_name, table, rows, nbytes, estimate) -> None:
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
                    "status": BackupSet.Status.RUNNING,
                },
            )
            self.table_ids[(shard_name, table)] = obj.pk
        else:
            TableBackup.objects.filter(pk=table_id).update(**values)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def backup_execute(
    *,
    backup_set: BackupSet,
    on_progress: Callable[[dict], None] | None = None,
    runner_job_id: str = "",
) -> BackupSet:
    """Run one pending set to its end (called by the `backups` job, or in-process by `--wait`).

    Idempotent: only a `pending` set is run; any other state is returned unchanged. Holds
    per-instance connection slots (Instance.max_connections across all workers), checks every
    shard is reachable before locking anything, runs the engine with a heartbeat and progress
    written about once a second, honours cancel within seconds, and persists the result.
    `succeeded` only when the engine says every object and the manifest were stored and
    checked; otherwise `failed` with per-shard reasons, and the set's objects are deleted.
    """
    with transaction.atomic():
        locked = BackupSet.objects.select_for_update().get(pk=backup_set.pk)
        rerun_after_death = (
            locked.status == BackupSet.Status.RUNNING
            and runner_job_id
            and locked.job_id == runner_job_id
        )
        if locked.status != BackupSet.Status.PENDING and not rerun_after_death:
            return locked
    if rerun_after_death:
        # RQ runs one job id once at a time: finding our own set still running means the
        # previous execution of this very job died (its work horse was killed) mid-run.
        return _finish_failed(
            locked,
            "the worker running this backup stopped (killed or crashed) at "
            f"{timezone.now():%Y-%m-%d %H:%M:%S} UTC: RQ re-ran its job after the work horse "
            "died; the set is incomplete and not usable",
            actor=HOUSEKEEPING_ACTOR,
        )
    with transaction.atomic():
        locked = BackupSet.objects.select_for_update().get(pk=backup_set.pk)
        if locked.status != BackupSet.Status.PENDING:
            return locked
        now = timezone.now()
        if not runner_job_id:
            # Run in-process (`backup --wait` without a worker): a late worker taking the
            # queued job must see that someone else runs this set.
            locked.job_id = f"local:{socket.gethostname()}:{os.getpid()}"
        locked.status = BackupSet.Status.RUNNING
        locked.started_at = now
        locked.heartbeat_at = now
        locked.progress_text = "starting"
        locked.save()
        locked.shard_backups.update(status=BackupSet.Status.RUNNING, started_at=now)
        audit_record(actor=WORKER_ACTOR, action="backup.run", obj=locked, details={})
    backup_set = locked

    progress = _Progress()
    slots = None
    heartbeat = None
    state: dict[str, Any] = {}
    try:
        try:
            result = _execute_engine(backup_set, progress, on_progress, state)
        finally:
            slots = state.get("slots")
            heartbeat = state.get("heartbeat")
            if heartbeat is not None:
                if state.get("engine_done"):
                    heartbeat.tick(force=True)
                heartbeat.stop()
            if slots is not None:
                slots.release()
    except _Outcome as outcome:
        if outcome.cancelled:
            return _finish_cancelled(backup_set)
        return _finish_failed(backup_set, outcome.message, shard_errors=outcome.shard_errors)
    except Exception as exc:
        log.exception("backup set %s failed unexpectedly", backup_set.pk)
        _finish_failed(backup_set, f"internal error: {exc.__class__.__name__}: {exc}")
        raise
    if not result.ok:
        shard_errors = {s.name: s.error for s in result.shards if s.error}
        message = result.error or "; ".join(f"{k}: {v}" for k, v in shard_errors.items())
        return _finish_failed(
            backup_set, message or "the engine reported a failure", shard_errors=shard_errors
        )
    return _finish_succeeded(backup_set, result)


def _execute_engine(backup_set: BackupSet, progress, on_progress, state: dict):
    """Slots, heartbeat, preflight, engine; records what it started in `state` for cleanup."""
    from backups.engine.errors import EngineError
    from backups.services.connection_slots import SlotsUnavailable

    try:
        storage = _storage_for(backup_set)
    except EngineError as exc:  # a misconfigured storage URL: one sentence on the set
        raise _Outcome(f"backup could not start: {exc}") from None
    shard_backups = list(
        backup_set.shard_backups.select_related("shard__instance").order_by("shard_name")
    )
    try:
        slots = state["slots"] = _connection_slots(backup_set, shard_backups)
    except SlotsUnavailable as exc:
        raise _Outcome(f"backup could not start: {exc}") from None
    heartbeat = state["heartbeat"] = _Heartbeat(backup_set, progress, slots, on_progress)
    heartbeat.start()
    if slots is not None:
        progress.text = "waiting for free connection slots on the instances"
        progress.dirty = True
        try:
            slots.acquire(wait=SLOT_WAIT_SECONDS, should_cancel=heartbeat.cancel.is_set)
        except SlotsUnavailable as exc:
            if heartbeat.cancel.is_set():
                raise _Outcome(cancelled=True) from None
            raise _Outcome(f"backup could not start: {exc}") from None
    if heartbeat.cancel.is_set():
        raise _Outcome(cancelled=True)
    spec = _backup_spec(backup_set, shard_backups, slots)
    result = _run_engine(spec, storage, progress, heartbeat.cancel.is_set)
    state["engine_done"] = True
    return result


class _Outcome(Exception):
    def __init__(self, message="", *, cancelled=False, shard_errors=None):
        super().__init__(message)
        self.message = message
        self.cancelled = cancelled
        self.shard_errors = shard_errors or {}


def _connection_slots(backup_set, shard_backups):
    """Slots for every instance of the set (None when this process has no Redis).

    The engine holds one control connection per instance plus its dump connections:
    locked mode N per instance (so at least 2 in all), lockfree one per shard.
    """
    from backups.services.connection_slots import ConnectionSlots, SlotNeed

    try:
        import django_rq

        redis = django_rq.get_connection(QUEUE)
    except Exception:  # noqa: BLE001
        return None
    caps: dict[str, int] = {}
    shard_counts: dict[str, int] = {}
    for sb in shard_backups:
        instance = sb.shard.instance
        address = f"{instance.host}:{instance.port}"
        caps[address] = min(caps.get(address, instance.max_connections), instance.max_connections)
        shard_counts[address] = shard_counts.get(address, 0) + 1
    needs = {}
    for address, cap in caps.items():
        if backup_set.consistency == BackupSet.Consistency.LOCKED:
            needs[address] = SlotNeed(cap=cap, minimum=2, wanted=cap)
        else:
            exact = shard_counts[address] + 1
            needs[address] = SlotNeed(cap=cap, minimum=exact, wanted=exact)
    ttl = max(30, settings.JOB_HEARTBEAT_STALE_SECONDS * 2)
    return ConnectionSlots(redis, needs, holder=job_id_for(backup_set.pk), ttl=ttl)


def _backup_spec(backup_set: BackupSet, shard_backups, slots):
    from backups.engine.errors import ConnectError
    from backups.engine.mysql import connect
    from backups.engine.types import BackupSpec, ShardSpec
    from console.keys import manifest_hmac_key
    from shards.selectors import instance_endpoint

    specs = []
    errors: dict[str, str] = {}
    endpoints = {}
    for sb in shard_backups:
        instance = sb.shard.instance
        try:
            endpoint = endpoints.get(instance.pk) or instance_endpoint(instance)
            endpoints[instance.pk] = endpoint
            # Preflight: refuse before locking anything when a shard cannot be reached.
            conn = connect(endpoint, sb.shard.database, connect_timeout=5)
            conn.close()
        except Exception as exc:  # noqa: BLE001 - unreachable, no password, bad settings...
            errors[sb.shard_name] = f"shard {sb.shard_name} (instance {instance.name}) " + (
                f"is unreachable: {exc}"
                if isinstance(exc, ConnectError)
                else f"cannot be used: {exc}"
            )
            continue
        specs.append(
            ShardSpec(
                name=sb.shard_name,
                instance=instance.name,
                database=sb.shard.database,
                endpoint=endpoint,
            )
        )
    if errors:
        raise _Outcome(
            "backup refused before locking anything: " + "; ".join(errors.values()),
            shard_errors=errors,
        )
    instances = {sb.shard.instance_id: sb.shard.instance for sb in shard_backups}
    # Dump connections per instance in locked mode: the slots granted minus the control one.
    connections = min(i.max_connections for i in instances.values()) - 1
    if slots is not None and slots.granted:
        connections = min(slots.granted.values()) - 1
    return BackupSpec(
        cluster=backup_set.cluster.name,
        set_id=backup_set.pk,
        set_prefix=backup_set.object_prefix,
        shards=specs,
        consistency=backup_set.consistency,
        compression_level=backup_set.compression_level,
        data_key=_unwrap_data_key(backup_set),
        key_id=backup_set.key_id,
        wrapped_key=backup_set.wrapped_key,
        manifest_hmac_key=manifest_hmac_key(),
        connections_per_instance=max(1, connections),
        chunk_rows=settings.BACKUP_CHUNK_ROWS,
        lock_wait_timeout=settings.BACKUP_LOCK_WAIT_TIMEOUT,
        lock_retries=settings.BACKUP_LOCK_RETRIES,
        topology=_topology_snapshot(backup_set, instances.values(), shard_backups),
        started_by=(
            backup_set.triggered_by.get_username() if backup_set.triggered_by_id else "system"
        ),
    )


def _topology_snapshot(backup_set, instances, shard_backups) -> dict[str, Any]:
    return {
        "cluster": backup_set.cluster.name,
        "shard_key": backup_set.cluster.shard_key,
        "instances": [
            {
                "name": i.name,
                "host": i.host,
                "port": i.port,
                "user": i.user,
                "flavour": i.flavour,
                "server_version": i.server_version,
                "server_id": i.server_id,
            }
            for i in sorted(instances, key=lambda i: i.name)
        ],
        "shards": [
            {"name": sb.shard_name, "instance": sb.instance_name, "database": sb.database}
            for sb in shard_backups
        ],
        "logical_tables": [
            {"name": t.name, "pattern": t.pattern} for t in backup_set.cluster.logical_tables.all()
        ],
    }


def _storage_for(backup_set: BackupSet):
    from backups.storage import storage_from_url

    return storage_from_url(backup_set.storage_url, endpoint_url=settings.S3_ENDPOINT_URL)


def _run_engine(spec, storage, progress, should_cancel):
    from backups.engine.dump import dump_cluster
    from backups.engine.errors import Cancelled, EngineError

    try:
        return dump_cluster(spec, storage, progress=progress, should_cancel=should_cancel)
    except Cancelled:
        raise _Outcome(cancelled=True) from None
    except EngineError as exc:
        raise _Outcome(str(exc)) from None
    except Exception:
        if should_cancel():
            raise _Outcome(cancelled=True) from None
        raise


def _delete_objects(backup_set: BackupSet) -> str:
    """Delete what the set stored; returns a sentence to append to its error, if that failed."""
    from backups.engine.errors import EngineError

    try:
        storage = _storage_for(backup_set)
    except EngineError:
        return ""  # an unusable storage URL: nothing can have been stored there
    try:
        storage.delete_prefix(backup_set.object_prefix)
    except Exception as exc:  # noqa: BLE001 - reported on the set instead
        log.exception("deleting objects of set %s failed", backup_set.pk)
        return (
            f" Its partial objects under {backup_set.object_prefix} could not be deleted "
            f"({exc}); they are not a usable backup."
        )
    return ""


def _finish_failed(
    backup_set: BackupSet,
    message: str,
    *,
    shard_errors: dict[str, str] | None = None,
    actor: str = WORKER_ACTOR,
    only_if: tuple[str, ...] = (BackupSet.Status.RUNNING,),
) -> BackupSet:
    note = _delete_objects(backup_set)
    with transaction.atomic():
        locked = BackupSet.objects.select_for_update().get(pk=backup_set.pk)
        if locked.status not in only_if:
            return locked
        now = timezone.now()
        locked.status = BackupSet.Status.FAILED
        locked.error = (message + note).strip()
        locked.finished_at = now
        locked.progress_text = "failed"
        locked.save()
        for sb in locked.shard_backups.all():
            error = (shard_errors or {}).get(sb.shard_name, "")
            sb.status = BackupSet.Status.FAILED
            sb.error = error or sb.error
            sb.finished_at = sb.finished_at or now
            sb.save(update_fields=["status", "error", "finished_at"])
        TableBackup.objects.filter(
            shard_backup__backup_set=locked, status=BackupSet.Status.RUNNING
        ).update(status=BackupSet.Status.FAILED)
        audit_record(actor=actor, action="backup.fail", obj=locked, details={"error": locked.error})
        transaction.on_commit(lambda: _after_failure(locked))
    return locked


def _after_failure(backup_set: BackupSet) -> None:
    """Alert (mail, webhook) that a set failed; an alert that cannot be sent never hides it."""
    from console.alerts import alert_backup_failed

    try:
        alert_backup_failed(backup_set)
    except Exception:  # noqa: BLE001 - the failure itself is recorded on the set
        log.exception("alerting about failed set %s failed", backup_set.pk)


def _after_success(backup_set: BackupSet) -> None:
    """Queue the storage check of a new set when the cluster's policy asks for it."""
    from backups.services.verification import verification_after_backup

    try:
        verification_after_backup(backup_set)
    except Exception:  # noqa: BLE001 - housekeeping verifies never-verified sets later
        log.exception("queueing the verification of set %s failed", backup_set.pk)


def _finish_cancelled(backup_set: BackupSet) -> BackupSet:
    note = _delete_objects(backup_set)
    with transaction.atomic():
        locked = BackupSet.objects.select_for_update().get(pk=backup_set.pk)
        if locked.status != BackupSet.Status.RUNNING:
            return locked
        locked.status = BackupSet.Status.CANCELLED
        locked.error = ("cancelled while running; nothing of it was kept." + note).strip()
        locked.finished_at = timezone.now()
        locked.progress_text = "cancelled"
        locked.save()
        locked.shard_backups.update(
            status=BackupSet.Status.CANCELLED, finished_at=locked.finished_at
        )
        TableBackup.objects.filter(shard_backup__backup_set=locked).exclude(
            status=BackupSet.Status.SUCCEEDED
        ).update(status=BackupSet.Status.CANCELLED)
        audit_record(actor=WORKER_ACTOR, action="backup.cancelled", obj=locked, details={})
    return locked


def _finish_succeeded(backup_set: BackupSet, result) -> BackupSet:
    with transaction.atomic():
        locked = BackupSet.objects.select_for_update().get(pk=backup_set.pk)
        if locked.status != BackupSet.Status.RUNNING:
            # The reaper or a cancel got there first: never turn that into a success.
            return locked
        now = timezone.now()
        by_name = {sb.shard_name: sb for sb in locked.shard_backups.all()}
        for shard in result.shards:
            sb = by_name.get(shard.name)
            if sb is None:
                continue
            sb.binlog_file = shard.binlog_file or ""
            sb.binlog_pos = shard.binlog_pos
            sb.gtid = shard.gtid or ""
            sb.snapshot_at = shard.snapshot_at
            sb.finished_at = now
            sb.status = BackupSet.Status.SUCCEEDED
            sb.rows = sum(t.rows for t in shard.tables)
            sb.raw_bytes = sum(t.raw_bytes for t in shard.tables)
            sb.stored_bytes = sum(t.stored_bytes for t in shard.tables)
            sb.rows_done = sb.rows
            sb.bytes_done = sb.raw_bytes
            sb.error = ""
            sb.save()
            _persist_tables(sb, shard.tables, now)
        locked.status = BackupSet.Status.SUCCEEDED
        locked.finished_at = now
        locked.consistent_at = result.consistent_at
        locked.lock_window_ms = result.lock_window_ms
        locked.manifest_sha256 = result.manifest_sha256 or ""
        locked.rows = result.rows or sum(sb.rows for sb in by_name.values())
        locked.raw_bytes = result.raw_bytes or sum(sb.raw_bytes for sb in by_name.values())
        locked.stored_bytes = result.stored_bytes or sum(sb.stored_bytes for sb in by_name.values())
        locked.rows_done = locked.rows
        locked.bytes_done = locked.raw_bytes
        locked.progress_text = "done"
        locked.error = ""
        locked.save()
        audit_record(
            actor=WORKER_ACTOR,
            action="backup.succeed",
            obj=locked,
            details={
                "rows": locked.rows,
                "stored_bytes": locked.stored_bytes,
                "lock_window_ms": locked.lock_window_ms,
                "manifest_sha256": locked.manifest_sha256,
            },
        )
        transaction.on_commit(lambda: _after_success(locked))
    return locked


def _persist_tables(shard_backup: ShardBackup, tables, now: datetime) -> None:
    existing = {t.name: t for t in shard_backup.tables.all()}
    for table in tables:
        row = existing.get(table.name) or TableBackup(shard_backup=shard_backup, name=table.name)
        row.database = table.database
        row.engine = table.engine
        row.has_primary_key = table.has_primary_key
        row.status = BackupSet.Status.FAILED if table.error else BackupSet.Status.SUCCEEDED
        row.rows = table.rows
        row.rows_estimate = row.rows_estimate or table.rows
        row.raw_bytes = table.raw_bytes
        row.stored_bytes = table.stored_bytes
        row.chunk_count = len(table.chunks)
        row.checksum = table.checksum
        row.error = table.error
        row.started_at = row.started_at or shard_backup.started_at
        row.finished_at = now
        row.save()
        row.chunks.all().delete()
        Chunk.objects.bulk_create(
            (
                Chunk(
                    table_backup=row,
                    index=c.index,
                    key=c.key,
                    rows=c.rows,
                    raw_bytes=c.raw_bytes,
                    stored_bytes=c.stored_bytes,
                    sha256=c.sha256,
                )
                for c in table.chunks
            ),
            batch_size=500,
        )


# ---------------------------------------------------------------------------- crashed workers


def backup_fail_from_job_failure(*, set_id: int, reason: str) -> BackupSet | None:
    """RQ says the job failed (exception, killed work horse, or abandoned): fail the set."""
    backup_set = BackupSet.objects.filter(pk=set_id).first()
    if backup_set is None or backup_set.status not in ACTIVE:
        return backup_set
    return _finish_failed(
        backup_set,
        f"the worker running this backup stopped: {reason}",
        only_if=ACTIVE,
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
    candidates = list(BackupSet.objects.filter(status__in=ACTIVE))
    for backup_set in candidates:
        reason = _death_reason(backup_set, now, stale)
        if reason:
            reaped.append(
                _finish_failed(backup_set, reason, actor=HOUSEKEEPING_ACTOR, only_if=ACTIVE)
            )
    return reaped


def _death_reason(backup_set: BackupSet, now: datetime, stale: timedelta) -> str:
    if backup_set.status == BackupSet.Status.RUNNING:
        last = backup_set.heartbeat_at or backup_set.started_at or backup_set.created_at
        if now - last > stale:
            return (
                "the worker running this backup stopped (killed or crashed) at "
                f"{last:%Y-%m-%d %H:%M:%S} UTC: no heartbeat for "
                f"{int((now - last).total_seconds())} s; the set is incomplete and not usable"
            )
        # A killed work horse under a live worker: RQ has already marked the job failed.
        # ("canceled" is how `backup --wait` takes a job over to run it in-process.)
        status = _rq_job_status(backup_set.job_id) if backup_set.job_id else "unknown"
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
    status = _rq_job_status(backup_set.job_id)
    if status in ("queued", "scheduled", "deferred", "started", "unknown"):
        return ""
    if status == "missing":
        return (
            "its queued job was lost (Redis was flushed or the job expired) before a worker took it"
        )
    return f"its job ended as '{status}' before the backup started"


def _rq_job_status(job_id: str) -> str:
    if not job_id:
        return "missing"
    try:
        import django_rq
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(job_id, connection=django_rq.get_connection(QUEUE))
        except NoSuchJobError:
            return "missing"
        status = job.get_status(refresh=False)
        return str(getattr(status, "value", status) or "unknown")
    except Exception:  # noqa: BLE001 - Redis down: do not reap on a guess
        return "unknown"


def backup_run_in_process_if_unclaimed(
    *, backup_set: BackupSet, grace_seconds: float = 3.0
) -> BackupSet:
    """For `backup --wait` without a worker: if no worker took the job within the grace
    period, drop it from the queue and run the set in this process. The pending -> running
    transition decides who runs it, so a late worker simply finds it already running."""
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        backup_set.refresh_from_db(fields=["status"])
        if backup_set.status != BackupSet.Status.PENDING:
            return backup_set
        time.sleep(0.2)
    _cancel_rq_job(backup_set.job_id)
    close_old_connections()
    if backup_set.kind == BackupSet.Kind.INCREMENTAL:
        from backups.services.incrementals import incremental_execute

        return incremental_execute(backup_set=backup_set)
    return backup_execute(backup_set=backup_set)
