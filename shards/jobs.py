"""RQ jobs for topology (queue `default`), enqueued by dotted path from shards.services.discovery_runs."""

from __future__ import annotations

from backups.queue import CurrentJob
from shards.models import DiscoveryRun
from shards.services.discovery_runs import discovery_run


def discover_cluster_job(discovery_id: int) -> dict:
    """Run one queued discovery; idempotent (a finished run is left alone)."""
    run = DiscoveryRun.objects.select_related("cluster", "requested_by").get(pk=discovery_id)
    actor = run.requested_by or "worker"
    run = discovery_run(cluster=run.cluster, actor=actor, discovery=run)
    CurrentJob().publish({"progress": run.progress})
    return {"discovery": run.pk, "status": run.status}
