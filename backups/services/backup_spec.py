"""The engine's spec of a full backup set: preflight, connection slots, topology.

`backup_execute` (full_backups) asks for the set's connection slots, then for the spec
that `dump_cluster` runs: every shard's endpoint (each checked reachable first), the
connections per instance, the set's key and the cluster's topology as it is now.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from backups import queue
from backups.engine.errors import ConnectError
from backups.engine.mysql import connect
from backups.engine.types import BackupSpec, ShardSpec
from backups.models import BackupPolicy, BackupSet
from backups.services.connection_slots import ConnectionSlots, SlotNeed
from backups.services.sets import set_data_key, set_job_id
from console.keys import manifest_hmac_key
from shards.selectors import instance_endpoint


class PreflightRefused(Exception):
    """A shard of the set cannot be reached or used: the backup is refused untouched."""

    def __init__(self, message: str, *, shard_errors: dict[str, str]):
        super().__init__(message)
        self.message = message
        self.shard_errors = shard_errors


def backup_connection_slots(
    *, backup_set: BackupSet, shard_backups, holder: str = ""
) -> ConnectionSlots | None:
    """Slots for every instance of `shard_backups` (None when this process has no Redis),
    held as `holder` (default the set's job id; a part of a fanned-out set has its own).

    The engine holds one control connection per instance plus its dump connections:
    locked and cold modes N per instance (so at least 2 in all), lockfree one per shard;
    and, when the policy sets max_threads_running, the throttle's poll connection per
    instance (never for cold sets, which are not throttled).
    """
    try:
        redis = queue.redis_connection(queue.BACKUPS)
    except Exception:  # noqa: BLE001
        return None
    policy = BackupPolicy.objects.filter(cluster_id=backup_set.cluster_id).first()
    cold = backup_set.consistency == BackupSet.Consistency.COLD
    poll = 1 if policy and policy.max_threads_running and not cold else 0
    caps: dict[str, int] = {}
    shard_counts: dict[str, int] = {}
    for sb in shard_backups:
        instance = sb.shard.instance
        address = f"{instance.host}:{instance.port}"
        caps[address] = min(caps.get(address, instance.max_connections), instance.max_connections)
        shard_counts[address] = shard_counts.get(address, 0) + 1
    needs = {}
    for address, cap in caps.items():
        if backup_set.consistency in (BackupSet.Consistency.LOCKED, BackupSet.Consistency.COLD):
            needs[address] = SlotNeed(cap=cap, minimum=2 + poll, wanted=cap)
        else:
            exact = shard_counts[address] + 1 + poll
            needs[address] = SlotNeed(cap=cap, minimum=exact, wanted=exact)
    ttl = max(30, settings.JOB_HEARTBEAT_STALE_SECONDS * 2)
    return ConnectionSlots(redis, needs, holder=holder or set_job_id(backup_set.pk), ttl=ttl)


def backup_spec_build(*, backup_set: BackupSet, shard_backups, slots) -> BackupSpec:
    """The engine's spec of a full set, after checking every shard can be reached.

    Raises PreflightRefused (before anything is locked) when a shard is unreachable or
    unusable. In locked mode the dump connections per instance are the slots granted
    minus the control connection.
    """
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
        raise PreflightRefused(
            "backup refused before locking anything: " + "; ".join(errors.values()),
            shard_errors=errors,
        )
    instances = {sb.shard.instance_id: sb.shard.instance for sb in shard_backups}
    policy = BackupPolicy.objects.filter(cluster_id=backup_set.cluster_id).first()
    # Dump connections per instance in locked mode: the slots granted minus the control one
    # (and minus the throttle's poll connection when the policy throttles).
    throttled = policy and policy.max_threads_running and backup_set.consistency != "cold"
    reserved = 1 + (1 if throttled else 0)
    connections = min(i.max_connections for i in instances.values()) - reserved
    if slots is not None and slots.granted:
        connections = min(slots.granted.values()) - reserved
    return BackupSpec(
        cluster=backup_set.cluster.name,
        set_id=backup_set.pk,
        set_prefix=backup_set.object_prefix,
        shards=specs,
        consistency=backup_set.consistency,
        compression_level=backup_set.compression_level,
        data_key=set_data_key(backup_set),
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
        exclude_tables=tuple(policy.exclude_tables or ()) if policy else (),
        max_threads_running=policy.max_threads_running if policy else 0,
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
