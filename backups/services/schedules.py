"""Scheduled backups: full backups on the policy's `full_cron` (UTC) and incrementals every
`incremental_every_minutes`, run by RQ's scheduler (workers started with `--with-scheduler`).

* `schedules_arm(*, cluster_ids=None)` queues each policy's next full and next incremental
  tick at its time, with a job id made of cluster, kind and tick time (`schedule-3-full-
  20260101T0200Z`): arming again, from any number of processes, never queues a tick twice.
  Ticks the policy no longer names are cancelled. It runs after every policy change, after
  every tick and every minute (the periodic job "schedules" of `backups.queue.PERIODIC`),
  so schedules survive worker restarts and a lost Redis.
* `schedule_tick(*, cluster, kind, tick_at)` runs one tick: recorded once in ScheduleTick
  (two schedulers that fire the same tick meet at its unique constraint), skipped with one
  `schedule.skipped` audit event when a backup of the cluster is pending or running (no
  failed set, no alert), otherwise a set with trigger "scheduler". An incremental tick whose
  chain needs a full backup first takes that full backup itself.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from itertools import islice

from django.db import IntegrityError, transaction

from backups import queue
from backups.models import BackupPolicy, BackupSet, ScheduleTick
from backups.selectors.policies import (
    FULL,
    INCREMENTAL,
    full_tick_matches,
    full_ticks,
    incremental_tick_matches,
    incremental_ticks,
)
from backups.services.connection_slots import (
    SlotNeed,
    instance_needs,
    slots_at_cap_sentence,
    slots_short,
)
from backups.services.errors import BackupError, BackupRefused
from backups.services.full_backups import backup_start
from backups.services.incrementals import incremental_chain_problem, incremental_start
from backups.services.sets import busy_reason
from console.audit import audit_record
from shards.models import Cluster

log = logging.getLogger(__name__)

SCHEDULER_ACTOR = "scheduler"
TICK_JOB = "backups.jobs.schedules.schedule_tick_job"


def schedule_job_id(cluster_id: int, kind: str, tick_at: datetime) -> str:
    return f"schedule-{cluster_id}-{kind}-{tick_at:%Y%m%dT%H%MZ}"


def _tick_matches(policy: BackupPolicy, kind: str, tick_at: datetime) -> bool:
    if kind == FULL:
        return full_tick_matches(policy.full_cron, tick_at)
    if kind == INCREMENTAL:
        return incremental_tick_matches(policy.incremental_every_minutes, tick_at)
    return False


def _next_ticks(policy: BackupPolicy, now: datetime | None) -> list[tuple[str, datetime]]:
    ticks = [(FULL, at) for at in islice(full_ticks(policy.full_cron, after=now), 1)]
    ticks += [
        (INCREMENTAL, at)
        for at in islice(incremental_ticks(policy.incremental_every_minutes, after=now), 1)
    ]
    return ticks


def schedules_arm(
    *, cluster_ids: list[int] | None = None, now: datetime | None = None
) -> list[str]:
    """Queue the next tick of every schedule (of `cluster_ids`, or of every cluster) on RQ's
    scheduler; cancel armed ticks their policy no longer names. Returns the job ids armed by
    this call (a tick already armed is not armed again). Raises QueueUnavailable without Redis.
    """
    policies = BackupPolicy.objects.select_related("cluster").order_by("cluster_id")
    if cluster_ids is not None:
        policies = policies.filter(cluster_id__in=cluster_ids)
    armed_ids = queue.scheduled_job_ids(queue.DEFAULT)
    armed = []
    for policy in policies:
        prefix = f"schedule-{policy.cluster_id}-"
        for job_id in armed_ids:
            if job_id.startswith(prefix) and not _armed_tick_still_wanted(policy, job_id):
                queue.cancel(job_id, queue=queue.DEFAULT)
        for kind, at in _next_ticks(policy, now):
            job_id = schedule_job_id(policy.cluster_id, kind, at)
            if job_id in armed_ids:
                continue
            if queue.enqueue(
                TICK_JOB,
                policy.cluster_id,
                kind,
                at.isoformat(),
                queue=queue.DEFAULT,
                job_id=job_id,
                at=at,
                description=f"scheduled {kind} backup of {policy.cluster.name} at {at:%H:%M} UTC",
                result_ttl=24 * 3600,
            ):
                armed.append(job_id)
    return armed


def _armed_tick_still_wanted(policy: BackupPolicy, job_id: str) -> bool:
    try:
        _s, _cluster, kind, stamp = job_id.split("-", 3)
        tick_at = datetime.strptime(stamp, "%Y%m%dT%H%MZ").replace(tzinfo=UTC)
    except ValueError:
        return False
    return _tick_matches(policy, kind, tick_at)


def schedule_tick(*, cluster: Cluster, kind: str, tick_at: datetime) -> ScheduleTick | None:
    """Run the `kind` tick of `cluster`'s schedule due at `tick_at` (at most once).

    Returns the tick's record, or None when the policy no longer names this tick or another
    scheduler already ran it. A busy cluster skips the tick (audited once, no set, no alert);
    otherwise the tick records a set with trigger "scheduler" and queues it.
    """
    policy = BackupPolicy.objects.filter(cluster=cluster).first()
    if policy is None or not _tick_matches(policy, kind, tick_at):
        return None
    if kind == INCREMENTAL and full_tick_matches(policy.full_cron, tick_at):
        return None  # the full backup of the same minute starts a new chain instead
    with transaction.atomic():
        # The cluster's row lock serialises this check with manual starts of the cluster.
        cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
        try:
            with transaction.atomic():
                tick = ScheduleTick.objects.create(
                    cluster=cluster,
                    kind=kind,
                    tick_at=tick_at,
                    outcome=ScheduleTick.Outcome.STARTED,
                )
        except IntegrityError:
            return None  # another scheduler took this tick
        busy = busy_reason(cluster) or _slots_short_reason(cluster, policy, kind)
        if busy:
            return _skip(tick, busy)
        try:
            backup_set = _start(cluster, policy, kind)
        except BackupError as exc:  # e.g. a cluster without shards: nothing to back up
            return _skip(tick, str(exc))
        backup_set.trigger = BackupSet.Trigger.SCHEDULER
        backup_set.save(update_fields=["trigger"])
        tick.backup_set = backup_set
        tick.note = f"{backup_set.kind} set {backup_set.pk}"
        tick.save(update_fields=["backup_set", "note"])
    return tick


def _slots_short_reason(cluster: Cluster, policy: BackupPolicy, kind: str) -> str:
    """Why the tick's backup could not get its connection slots now ("" when it could): a
    server of the cluster, shared with other jobs (another cluster on the same server, a
    restore, a drill), lacks the fewest connections the backup needs there. A probe only:
    the backup that starts still takes its slots itself."""
    shards = list(cluster.shards.select_related("instance"))
    if kind == INCREMENTAL and not incremental_chain_problem(cluster):
        extra = 0  # one binlog connection at a time per server
        per_shard = False
    else:
        # As backup_spec.backup_connection_slots: a control connection, dump connections
        # (locked, cold: at least one; lockfree: one per shard) and the throttle's poll.
        cold = policy.full_consistency == BackupSet.Consistency.COLD
        extra = 1 + (1 if policy.max_threads_running and not cold else 0)
        per_shard = policy.full_consistency == BackupSet.Consistency.LOCKFREE
    needs, names = instance_needs([s.instance for s in shards], minimum=1)
    for address in needs:
        on_it = sum(1 for s in shards if f"{s.instance.host}:{s.instance.port}" == address)
        minimum = (on_it if per_shard else 1) + extra
        needs[address] = SlotNeed(cap=needs[address].cap, minimum=minimum, wanted=minimum)
    try:
        redis = queue.redis_connection(queue.BACKUPS)
        short = slots_short(redis, needs)
        return slots_at_cap_sentence(redis, needs, short, names, advice="") if short else ""
    except queue.QueueUnavailable:  # the backup itself will say what is wrong
        return ""


def _skip(tick: ScheduleTick, reason: str) -> ScheduleTick:
    tick.outcome = ScheduleTick.Outcome.SKIPPED
    tick.note = reason
    tick.save(update_fields=["outcome", "note"])
    audit_record(
        actor=SCHEDULER_ACTOR,
        action="schedule.skipped",
        obj=tick.cluster,
        details={"kind": tick.kind, "tick_at": tick.tick_at.isoformat(), "reason": reason},
    )
    return tick


def _start(cluster: Cluster, policy: BackupPolicy, kind: str) -> BackupSet:
    """Record the tick's set (a full one when an incremental's chain needs one first)."""
    try:
        if kind == INCREMENTAL and not incremental_chain_problem(cluster):
            return incremental_start(cluster=cluster, actor=SCHEDULER_ACTOR)
        return backup_start(
            cluster=cluster,
            actor=SCHEDULER_ACTOR,
            kind=BackupSet.Kind.FULL,
            consistency=policy.full_consistency,
            method=policy.full_method,
        )
    except BackupRefused as exc:
        return exc.backup_set
