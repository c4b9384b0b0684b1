"""Physical full sets (mariabackup), one part per instance.

`physical_backup_run(spec, shard_backups, storage, tracker)` is the physical branch of
`full_backups.backup_execute`: after the shared reachability preflight and connection
slots, it checks each instance for physical backups (mariabackup on this worker, its
version, the user's privileges, a readable datadir: one sentence per missing piece), then
streams every instance in turn into `<set>/physical/<instance>/backup.mbstream.zst[.enc]`
and writes the signed manifest listing those objects and each instance's binlog
coordinates. Its `BackupResult` carries each shard's coordinates (those of its instance),
so incrementals chain onto a physical set exactly as onto a logical one.

A failure or cancel deletes what was stored (the finish transitions do so for the whole
set prefix; the engine removes a half-written object itself).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime

from django.conf import settings

from backups import queue
from backups.engine.errors import Cancelled, EngineError
from backups.engine.manifest import manifest_document, manifest_encryption, manifest_write
from backups.engine.physical import (
    PhysicalPart,
    PhysicalResult,
    physical_backup,
    physical_key,
    physical_preflight,
)
from backups.engine.types import BackupResult, BackupSpec, ShardResult
from backups.models import BackupSet, ShardBackup
from backups.services.backup_spec import PreflightRefused
from backups.services.sets import set_data_key, set_prefix, set_storage
from backups.status import SetStatus
from backups.storage.base import key_part
from shards.models import Instance
from shards.selectors import instance_endpoint

PATH_ENV = "SHARDVAULT_MARIABACKUP_PATH"


def physical_search_path() -> str | None:
    """Where this worker looks for mariabackup/mbstream: SHARDVAULT_MARIABACKUP_PATH when
    set (a PATH-like list), else the process's PATH."""
    return os.environ.get(PATH_ENV) or None


def physical_preflight_set(
    *, spec: BackupSpec, datadirs: dict[str, str], remote: Collection[str] = ()
) -> None:
    """PreflightRefused naming every missing piece, per shard, before anything is copied.
    Instances in `remote` (served by a host agent) are checked by their agent instead."""
    endpoints = {}
    for shard in spec.shards:
        if shard.instance not in remote:
            endpoints.setdefault(shard.instance, shard.endpoint)
    by_instance: dict[str, list[str]] = {}
    for instance, endpoint in endpoints.items():
        problems = physical_preflight(
            endpoint, datadirs.get(instance, ""), search_path=physical_search_path()
        )
        if problems:
            by_instance[instance] = problems
    if not by_instance:
        return
    shard_errors = {
        shard.name: " ".join(p.rstrip(".") + "." for p in by_instance[shard.instance])
        for shard in spec.shards
        if shard.instance in by_instance
    }
    sentences = [p.rstrip(".") + "." for problems in by_instance.values() for p in problems]
    raise PreflightRefused(
        "physical backup refused: " + " ".join(sentences), shard_errors=shard_errors
    )


def physical_backup_run(
    *,
    spec: BackupSpec,
    datadirs: dict[str, str],
    storage,
    progress,
    should_cancel,
    agent_queues: dict[str, str] | None = None,
    on_part: Callable[[str, str], None] | None = None,
) -> BackupResult:
    """Copy every instance of `spec` with mariabackup, then write the manifest.

    An instance with an agent queue (`agent_queues[instance]`) is copied by the worker
    serving that queue (`physical_part_execute`, enqueued here, waited for); the others run
    here, one after the other. `on_part(instance, worker)` is told who copied each part.
    Raises PreflightRefused (nothing copied), EngineError (a part failed: the caller fails
    the set, which deletes its objects) or Cancelled.
    """
    agent_queues = {k: v for k, v in (agent_queues or {}).items() if v}
    physical_preflight_set(spec=spec, datadirs=datadirs, remote=agent_queues)
    created_at = datetime.now(UTC)
    instances: list[str] = []
    endpoints = {}
    for shard in spec.shards:
        if shard.instance not in endpoints:
            instances.append(shard.instance)
            endpoints[shard.instance] = shard.endpoint
    remote_jobs = {
        instance: _part_enqueue(spec.set_id, instance, agent_queues[instance])
        for instance in instances
        if instance in agent_queues
    }
    results: dict[str, PhysicalResult] = {}
    try:
        for instance in instances:
            if instance in remote_jobs:
                continue
            part = PhysicalPart(
                instance=instance,
                endpoint=endpoints[instance],
                datadir=datadirs[instance],
                key=physical_key(spec.set_prefix, key_part(instance), spec.data_key is not None),
                compression_level=spec.compression_level,
                data_key=spec.data_key,
                search_path=physical_search_path(),
            )
            results[instance] = physical_backup(
                part, storage, progress=progress, should_cancel=should_cancel
            )
            if on_part is not None:
                on_part(instance, socket.gethostname())
        for instance, job_id in remote_jobs.items():
            results[instance] = _part_wait(
                instance, job_id, agent_queues[instance], should_cancel=should_cancel
            )
            if on_part is not None:
                on_part(instance, results[instance].worker)
    except BaseException:
        for instance, job_id in remote_jobs.items():
            queue.cancel(job_id, queue=agent_queues[instance])
        raise
    consistent_at = max(r.finished_at for r in results.values())
    shards = [
        ShardResult(
            name=shard.name,
            instance=shard.instance,
            database=shard.database,
            binlog_file=results[shard.instance].binlog_file,
            binlog_pos=results[shard.instance].binlog_pos,
            gtid=results[shard.instance].gtid,
            snapshot_at=results[shard.instance].finished_at,
            tables=[],
        )
        for shard in spec.shards
    ]
    raw = sum(r.raw_bytes for r in results.values())
    stored = sum(r.stored_bytes for r in results.values())
    physical_objects = [
        {
            "instance": r.instance,
            "key": r.key,
            "sha256": r.sha256,
            "stored_bytes": r.stored_bytes,
            "raw_bytes": r.raw_bytes,
            "binlog_file": r.binlog_file,
            "binlog_pos": r.binlog_pos,
            "gtid": r.gtid,
            "datadir": datadirs[r.instance],
            "tool": "mariabackup",
            "tool_version": r.tool_version,
            "started_at": r.started_at.isoformat(),
            "finished_at": r.finished_at.isoformat(),
            "seconds": round(r.seconds, 3),
        }
        for r in results.values()
    ]
    doc = manifest_document(
        cluster=spec.cluster,
        set_id=spec.set_id,
        kind="full",
        parent=None,
        consistency=spec.consistency,
        created_at=created_at.isoformat(),
        consistent_at=consistent_at.isoformat(),
        compression_level=spec.compression_level,
        encryption=(
            manifest_encryption(key_id=spec.key_id, wrapped_key=spec.wrapped_key)
            if spec.data_key is not None
            else None
        ),
        shards=[
            {
                "name": s.name,
                "instance": s.instance,
                "database": s.database,
                "binlog_file": s.binlog_file,
                "binlog_pos": s.binlog_pos,
                "gtid": s.gtid,
                "snapshot_at": s.snapshot_at.isoformat() if s.snapshot_at else None,
                "tables": [],
            }
            for s in shards
        ],
        binlog=[],
        totals={"rows": 0, "raw_bytes": raw, "stored_bytes": stored},
        method="physical",
        lock_window_ms=None,
        started_by=spec.started_by,
        topology=spec.topology,
        physical=physical_objects,
        # No per-table checksums: mariabackup's consistent point is inside its own
        # BLOCK_COMMIT stage, where no snapshot of ours can be opened. Drills rest on
        # CHECK TABLE and row counts (verification says so).
        checksums=None,
    )
    try:
        stored_manifest = manifest_write(storage, spec.set_prefix, doc, spec.manifest_hmac_key)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"storage write failed for the manifest: {exc}") from exc
    return BackupResult(
        ok=True,
        shards=shards,
        lock_window_ms=None,
        consistent_at=consistent_at,
        manifest_key=stored_manifest.key,
        manifest_sha256=stored_manifest.sha256,
        rows=0,
        raw_bytes=raw,
        stored_bytes=stored,
        physical=physical_objects,
    )


# ---------------------------------------------------------------------------- host agents

PART_JOB = "backups.jobs.backups.run_physical_part"


def physical_part_job_id(set_id: int, instance: str) -> str:
    return f"backup-{set_id}-physical-{instance}"


def _part_enqueue(set_id: int, instance: str, agent_queue: str) -> str:
    job_id = physical_part_job_id(set_id, instance)
    try:
        queue.enqueue(PART_JOB, set_id, instance, queue=agent_queue, job_id=job_id)
    except queue.QueueUnavailable as exc:
        raise EngineError(f"cannot queue the part of instance {instance}: {exc}") from exc
    return job_id


def _part_wait(instance: str, job_id: str, agent_queue: str, *, should_cancel) -> PhysicalResult:
    """The result of a part run by the host agent serving `agent_queue`."""
    pickup = float(settings.PHYSICAL_AGENT_PICKUP_SECONDS)
    queued_since = time.monotonic()
    while True:
        if should_cancel():
            raise Cancelled("backup cancelled")
        status, value = queue.job_outcome(job_id, queue=agent_queue)
        if status == "finished":
            if not isinstance(value, dict) or not value.get("key"):
                raise EngineError(f"the agent on {agent_queue} returned no part for {instance}")
            return _result_from(value)
        if status in ("failed", "stopped", "canceled", "missing"):
            raise EngineError(
                f"the physical part of instance {instance} on queue {agent_queue} {status}: "
                f"{value or 'no reason given'}"
            )
        if status == "queued" and time.monotonic() - queued_since > pickup:
            raise EngineError(
                f"no worker took the physical part of instance {instance} from queue "
                f"{agent_queue} within {pickup:.0f} s: start `manage.py rqworker {agent_queue}` "
                "on the database host"
            )
        if status != "queued":
            queued_since = time.monotonic()
        time.sleep(0.5)


def _result_from(value: dict) -> PhysicalResult:
    return PhysicalResult(
        instance=value["instance"],
        key=value["key"],
        raw_bytes=int(value["raw_bytes"]),
        stored_bytes=int(value["stored_bytes"]),
        sha256=value["sha256"],
        binlog_file=value["binlog_file"],
        binlog_pos=value["binlog_pos"],
        gtid=value.get("gtid", ""),
        started_at=datetime.fromisoformat(value["started_at"]),
        finished_at=datetime.fromisoformat(value["finished_at"]),
        tool_version=value.get("tool_version", ""),
        worker=value.get("worker", ""),
    )


def physical_part_execute(*, set_id: int, instance_name: str) -> dict:
    """Run one instance's part on this worker (a host agent); returns the part as a dict.

    Only while the set is running: a part of a set that ended (failed, cancelled, reaped) is
    refused, and one that ends while the part streams is stopped, its object removed.
    EngineError (with the preflight's sentences) when this host cannot copy the instance.
    """
    backup_set = BackupSet.objects.select_related("cluster").get(pk=set_id)
    if backup_set.status != SetStatus.RUNNING:
        raise EngineError(f"set {set_id} is {backup_set.status}; its part is not needed")
    instance = Instance.objects.get(cluster=backup_set.cluster, name=instance_name)
    endpoint = instance_endpoint(instance)
    problems = physical_preflight(endpoint, instance.datadir, search_path=physical_search_path())
    if problems:
        raise EngineError(" ".join(p.rstrip(".") + "." for p in problems))
    data_key = set_data_key(backup_set)
    part = PhysicalPart(
        instance=instance.name,
        endpoint=endpoint,
        datadir=instance.datadir,
        key=physical_key(set_prefix(backup_set), key_part(instance.name), data_key is not None),
        compression_level=backup_set.compression_level,
        data_key=data_key,
        search_path=physical_search_path(),
    )

    def set_ended() -> bool:
        row = BackupSet.objects.filter(pk=set_id).values("status", "cancel_requested").first()
        return row is None or row["status"] != SetStatus.RUNNING or row["cancel_requested"]

    storage = set_storage(backup_set)
    result = physical_backup(part, storage, progress=lambda event: None, should_cancel=set_ended)
    if set_ended():
        storage.delete(result.key)  # the set failed meanwhile: never leave an orphan
        raise EngineError(f"set {set_id} ended while instance {instance_name} was copied")
    return {
        "instance": result.instance,
        "key": result.key,
        "raw_bytes": result.raw_bytes,
        "stored_bytes": result.stored_bytes,
        "sha256": result.sha256,
        "binlog_file": result.binlog_file,
        "binlog_pos": result.binlog_pos,
        "gtid": result.gtid,
        "started_at": result.started_at.isoformat(),
        "finished_at": result.finished_at.isoformat(),
        "tool_version": result.tool_version,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }


def physical_part_worker_record(*, set_id: int, instance: str, worker: str) -> None:
    """Which worker copied an instance, on its shards' parts (`backups show`'s "worker")."""
    ShardBackup.objects.filter(backup_set_id=set_id, shard__instance__name=instance).update(
        worker=worker[:255]
    )
