"""RQ job for scheduled backups (queue `default`, on RQ's scheduler): load ids, call one service."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import close_old_connections

from backups import queue
from backups.services import schedules
from shards.models import Cluster

log = logging.getLogger(__name__)


def schedule_tick_job(cluster_id: int, kind: str, tick_at: str) -> str:
    """Job id `schedule-<cluster>-<kind>-<tick>`: run that tick once, then arm the next one."""
    close_old_connections()
    try:
        cluster = Cluster.objects.filter(pk=cluster_id).first()
        if cluster is None:
            return "gone"
        tick = schedules.schedule_tick(
            cluster=cluster, kind=kind, tick_at=datetime.fromisoformat(tick_at)
        )
        if tick is None:
            return "not this scheduler's tick (already taken, or the policy changed)"
        return f"{tick.outcome}: {tick.note}"
    finally:
        try:
            schedules.schedules_arm(cluster_ids=[cluster_id])
            queue.periodic_ensure_scheduled()
        except Exception:  # noqa: BLE001 - the periodic "schedules" job arms it within a minute
            log.exception("arming the next tick of cluster %s failed", cluster_id)
