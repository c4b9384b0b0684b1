"""Discovery runs: queue one, run it (engine: shards.discovery), store what it found."""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from backups import queue
from backups.engine.errors import KeyMaterialError
from backups.models import BackupPolicy
from backups.services.connection_slots import connection_slots_held, instance_needs
from console.audit import audit_record
from shards import discovery as discovery_engine
from shards.models import Cluster, DiscoveryRun, Finding, Instance, PhysicalTable
from shards.selectors import MissingPassword, instance_endpoint
from shards.services.topology import topology_authorise

# A queued or running discovery older than this is considered abandoned.
DISCOVERY_STALE_AFTER = timedelta(minutes=15)
# How long a discovery waits for a connection slot on a server at its cap; then it fails
# saying which instance is at its cap and which jobs hold it.
DISCOVERY_SLOT_WAIT_SECONDS = 30


def discovery_slot_holder(discovery_id: int) -> str:
    return f"discovery-{discovery_id}"


def discovery_request(*, cluster: Cluster, actor) -> DiscoveryRun:
    """Queue a discovery of the cluster on the `default` RQ queue (job id `discover-<id>`).

    While a discovery of this cluster is pending or running, returns that one instead.
    """
    topology_authorise(actor, "run discovery")
    with transaction.atomic():
        Cluster.objects.select_for_update().get(pk=cluster.pk)
        active = cluster.discoveries.filter(status__in=DiscoveryRun.Status.ACTIVE).first()
        if active is not None and timezone.now() - active.created_at < DISCOVERY_STALE_AFTER:
            return active
        if active is not None:
            # Its worker died or never picked it up; let a new run replace it.
            _discovery_fail(active.pk, "abandoned: no worker finished it in time")
        run = DiscoveryRun.objects.create(
            cluster=cluster,
            requested_by=actor if hasattr(actor, "pk") else None,
            job_id="",
        )
        run.job_id = f"discover-{run.pk}"
        run.save(update_fields=["job_id"])
        audit_record(
            actor=actor, action="discovery.request", obj=cluster, details={"discovery": run.pk}
        )
        transaction.on_commit(lambda: discovery_enqueue(run=run))
    return run


def discovery_enqueue(*, run: DiscoveryRun) -> None:
    """Queue `shards.jobs.discover_cluster_job` for the run (job id `discover-<id>`, queue
    `default`); a job of that id still waiting or running is not queued twice.

    Without Redis the run is marked failed with a sentence saying so.
    """
    try:
        queue.enqueue(
            "shards.jobs.discover_cluster_job",
            run.pk,
            queue=queue.DEFAULT,
            job_id=run.job_id,
            timeout=600,
            # As before the move: RQ's own retention for discovery results and failures.
            result_ttl=500,
            failure_ttl=365 * 24 * 3600,
        )
    except queue.QueueUnavailable:
        _discovery_fail(run.pk, "the job queue (Redis) is not reachable: start Redis and try again")


def _discovery_fail(pk: int, error: str, **only) -> int:
    """Mark a run failed with `error` (if it still matches the `only` filters); rows changed."""
    return DiscoveryRun.objects.filter(pk=pk, **only).update(
        status=DiscoveryRun.Status.FAILED, error=error, finished_at=timezone.now()
    )


def discovery_run(
    *, cluster: Cluster, actor, discovery: DiscoveryRun | None = None
) -> DiscoveryRun:
    """Discover and preflight every instance and shard of the cluster, now, and store the results.

    Replaces the cluster's findings and the tables of every shard that could be
    read; updates each reachable instance's version, flavour and server_id.
    Server problems become findings, never exceptions. A queued run whose requester may no
    longer run discovery is marked failed with that sentence.
    """
    try:
        topology_authorise(actor, "run discovery")
    except PermissionDenied as exc:
        if discovery is not None:
            with transaction.atomic():
                if _discovery_fail(discovery.pk, str(exc), status=DiscoveryRun.Status.PENDING):
                    audit_record(
                        actor=actor,
                        action="discovery.fail",
                        obj=cluster,
                        details={"discovery": discovery.pk, "error": str(exc)},
                    )
        raise
    if discovery is None:
        discovery = DiscoveryRun.objects.create(
            cluster=cluster, requested_by=actor if hasattr(actor, "pk") else None
        )
    with transaction.atomic():
        run = DiscoveryRun.objects.select_for_update().get(pk=discovery.pk)
        if DiscoveryRun.Status.is_final(run.status):
            return run  # a retried job: the work is done
        run.status = DiscoveryRun.Status.RUNNING
        run.progress_text = "connecting"
        run.save(update_fields=["status", "progress_text"])
        audit_record(
            actor=actor, action="discovery.start", obj=cluster, details={"discovery": run.pk}
        )

    instances = list(cluster.instances.all())
    shards = list(cluster.shards.select_related("instance"))
    endpoints, unavailable = {}, {}
    for instance in instances:
        try:
            endpoints[instance.name] = instance_endpoint(instance)
        # A key that cannot decrypt a stored password is a finding too.
        except (MissingPassword, KeyMaterialError) as exc:
            unavailable[instance.name] = str(exc)
    targets = [discovery_engine.ShardTarget(s.name, s.instance.name, s.database) for s in shards]

    last_write = [0.0]

    def progress(percent: int, text: str) -> None:
        now = timezone.now().timestamp()
        if percent < 100 and now - last_write[0] < 0.5:
            return
        last_write[0] = now
        DiscoveryRun.objects.filter(pk=run.pk).update(progress=percent, progress_text=text[:200])

    # Discovery opens one connection at a time, so one slot on every server it reaches.
    needs, names = instance_needs([i for i in instances if i.name in endpoints], minimum=1)
    try:
        with connection_slots_held(
            needs=needs,
            names=names,
            holder=discovery_slot_holder(run.pk),
            wait=DISCOVERY_SLOT_WAIT_SECONDS,
            say=lambda text: progress(0, text),
        ):
            result = discovery_engine.discover(
                endpoints,
                targets,
                progress=progress,
                unavailable=unavailable,
                exclude_tables=_policy_exclusions(cluster),
                cold=_policy_takes_cold(cluster),
                physical=_physical_instances(cluster, instances),
                physical_required=_policy_takes_physical(cluster),
            )
    except Exception as exc:  # an instance at its connection cap too (SlotsUnavailable)
        with transaction.atomic():
            _discovery_fail(run.pk, str(exc)[:2000])
            audit_record(
                actor=actor, action="discovery.fail", obj=cluster, details={"error": str(exc)}
            )
        raise
    _discovery_store(
        actor=actor, cluster=cluster, run=run, result=result, instances=instances, shards=shards
    )
    run.refresh_from_db()
    return run


def _policy_takes_physical(cluster: Cluster) -> bool:
    policy = BackupPolicy.objects.filter(cluster=cluster).first()
    return bool(policy and policy.full_method == "physical")


def _physical_instances(cluster: Cluster, instances) -> dict[str, tuple[str, str]]:
    """Instances to check for physical backups: every one when the policy takes physical
    fulls, else those that name a datadir or an agent queue."""
    every = _policy_takes_physical(cluster)
    return {
        i.name: (i.datadir, i.agent_queue) for i in instances if every or i.datadir or i.agent_queue
    }


def _policy_exclusions(cluster: Cluster) -> list[str]:
    """The cluster policy's exclude_tables globs (preflight does not refuse those tables)."""
    policy = BackupPolicy.objects.filter(cluster=cluster).first()
    return list(policy.exclude_tables or []) if policy else []


def _policy_takes_cold(cluster: Cluster) -> bool:
    """Whether the policy's scheduled fulls are cold (they may copy non-InnoDB tables)."""
    return BackupPolicy.objects.filter(cluster=cluster, full_consistency="cold").exists()


def _discovery_store(*, actor, cluster, run, result, instances, shards) -> None:
    now = timezone.now()
    by_instance = {i.name: i for i in instances}
    by_shard = {s.name: s for s in shards}
    with transaction.atomic():
        Cluster.objects.select_for_update().get(pk=cluster.pk)
        for name, info in result.instances.items():
            if info.reachable and name in by_instance:
                Instance.objects.filter(pk=by_instance[name].pk).update(
                    server_version=info.version[:120],
                    flavour=info.flavour,
                    server_id=info.server_id,
                    discovered_at=now,
                )
        for shard_name, tables in result.tables.items():
            shard = by_shard[shard_name]
            PhysicalTable.objects.filter(shard=shard).delete()
            PhysicalTable.objects.bulk_create(
                PhysicalTable(
                    shard=shard,
                    name=t.name,
                    engine=t.engine,
                    rows_estimate=t.rows,
                    data_bytes=t.data_bytes,
                    index_bytes=t.index_bytes,
                    has_primary_key=t.has_primary_key,
                    discovered_at=now,
                )
                for t in tables
            )
        Finding.objects.filter(cluster=cluster).delete()
        Finding.objects.bulk_create(
            Finding(
                cluster=cluster,
                discovery=run,
                severity=f.severity,
                code=f.code,
                instance=by_instance.get(f.instance),
                shard=by_shard.get(f.shard),
                table=f.table[:64],
                message=f.message,
            )
            for f in result.findings
        )
        DiscoveryRun.objects.filter(pk=run.pk).update(
            status=DiscoveryRun.Status.SUCCEEDED,
            progress=100,
            progress_text=f"done: {len(result.findings)} findings, worst {result.worst}",
            finished_at=now,
        )
        counts = {
            s: sum(1 for f in result.findings if f.severity == s)
            for s in ("ok", "warning", "error")
        }
        audit_record(
            actor=actor,
            action="discovery.finish",
            obj=cluster,
            details={
                "discovery": run.pk,
                "tables": sum(len(t) for t in result.tables.values()),
                **counts,
            },
        )
