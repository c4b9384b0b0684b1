"""RQ jobs for topology (queue `default`)."""

from __future__ import annotations


def discover_cluster_job(discovery_id: int) -> dict:
    """Run one queued discovery; idempotent (a finished run is left alone)."""
    from rq import get_current_job

    from shards.models import DiscoveryRun
    from shards.services import discovery_run

    run = DiscoveryRun.objects.select_related("cluster", "requested_by").get(pk=discovery_id)
    actor = run.requested_by or "worker"
    run = discovery_run(cluster=run.cluster, actor=actor, discovery=run)
    job = get_current_job()
    if job is not None:
        job.meta["progress"] = run.progress
        job.save_meta()
    return {"discovery": run.pk, "status": run.status}


def enqueue_discovery(run) -> None:
    """Enqueue `discover_cluster_job` with job id `discover-<id>`; a duplicate id is not queued twice.

    Without Redis the run is marked failed with a sentence saying so.
    """
    import django_rq
    from django.utils import timezone
    from redis.exceptions import ConnectionError as RedisConnectionError
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from shards.models import DiscoveryRun

    queue = django_rq.get_queue("default")
    job_id = f"discover-{run.pk}"
    try:
        try:
            existing = Job.fetch(job_id, connection=queue.connection)
        except NoSuchJobError:
            existing = None
        if existing is not None and existing.get_status(refresh=True) in (
            "queued",
            "started",
            "deferred",
            "scheduled",
        ):
            return
        queue.enqueue(discover_cluster_job, run.pk, job_id=job_id, job_timeout=600)
    except RedisConnectionError:
        DiscoveryRun.objects.filter(pk=run.pk).update(
            status=DiscoveryRun.Status.FAILED,
            error="the job queue (Redis) is not reachable: start Redis and try again",
            finished_at=timezone.now(),
        )
