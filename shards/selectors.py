"""Read-side queries for topology."""

from __future__ import annotations

import os

from django.conf import settings
from django.db.models import (
    Case,
    Count,
    IntegerField,
    OuterRef,
    Prefetch,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.shortcuts import get_object_or_404

from backups import queue
from backups.engine.mysql import Endpoint, password_env_refusal
from backups.services.connection_slots import slots_usage_text
from console.keys import decrypt_secret
from shards.models import SEVERITY_RANK, Cluster, Finding, Instance, PhysicalTable, Shard
from shards.topology_file import dump_topology


class MissingPassword(Exception):
    pass


def instance_endpoint(instance: Instance) -> Endpoint:
    """How to connect to an instance, with its password decrypted or read from its env variable.

    `password_env` is read here, by whichever process connects, each time (DESIGN.md).
    """
    if instance.password_env:
        refused = password_env_refusal(
            instance.password_env, settings.SHARDVAULT_PASSWORD_ENV_PATTERN
        )
        if refused:  # checked again here: a row saved before the rule, or edited in the database
            raise MissingPassword(f"instance {instance.name}: {refused}")
        if instance.password_env not in os.environ:
            raise MissingPassword(
                f"instance {instance.name}: environment variable {instance.password_env} "
                "is not set in this process"
            )
        password = os.environ[instance.password_env]
    else:
        password = decrypt_secret(instance.password_encrypted)
    return Endpoint(
        name=instance.name,
        host=instance.host,
        port=instance.port,
        user=instance.user,
        password=password,
        tls_ca=instance.tls_ca,
        tls_verify=instance.tls_verify,
    )


# --- pages and exports -----------------------------------------------------------------


def cluster_list_with_stats():
    """Clusters with shard and instance counts, total table bytes and worst finding (one query)."""
    size = (
        PhysicalTable.objects.filter(shard__cluster=OuterRef("pk"))
        .values("shard__cluster")
        .annotate(total=Sum("data_bytes") + Sum("index_bytes"))
        .values("total")
    )
    worst = (
        Finding.objects.filter(cluster=OuterRef("pk"))
        .annotate(
            rank=Case(
                When(severity="error", then=Value(2)),
                When(severity="warning", then=Value(1)),
                default=Value(0),
                output_field=IntegerField(),
            )
        )
        .order_by("-rank")
        .values("severity")[:1]
    )
    shard_count = (
        Shard.objects.filter(cluster=OuterRef("pk"))
        .values("cluster")
        .annotate(n=Count("pk"))
        .values("n")
    )
    instance_count = (
        Instance.objects.filter(cluster=OuterRef("pk"))
        .values("cluster")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Cluster.objects.annotate(
        shard_count=Coalesce(Subquery(shard_count, output_field=IntegerField()), 0),
        instance_count=Coalesce(Subquery(instance_count, output_field=IntegerField()), 0),
        total_bytes=Coalesce(Subquery(size), 0),
        worst_severity=Subquery(worst),
    ).order_by("name")


def cluster_by_name(name: str):
    return get_object_or_404(Cluster, name=name)


def cluster_topology(cluster) -> dict:
    """Instances with their shards and each shard's tables, findings, latest discovery."""
    shards = Shard.objects.filter(cluster=cluster).prefetch_related("tables").order_by("name")
    instances = list(
        cluster.instances.prefetch_related(Prefetch("shards", queryset=shards)).order_by("name")
    )
    usage = instance_connections_in_use(instances)
    for instance in instances:
        instance.connections_in_use = usage.get(instance.pk, "")
        instance.shard_list = list(instance.shards.all())
        for shard in instance.shard_list:
            shard.table_list = list(shard.tables.all())
            shard.total_bytes = sum(t.total_bytes for t in shard.table_list)
    findings = list(
        Finding.objects.filter(cluster=cluster).select_related("instance", "shard").order_by("id")
    )
    findings.sort(key=lambda f: -SEVERITY_RANK.get(f.severity, 0))
    return {
        "instances": instances,
        "findings": findings,
        "logical_tables": list(cluster.logical_tables.all()),
        "discovery": cluster.discoveries.order_by("-id").first(),
    }


def instance_connections_in_use(instances) -> dict[int, str]:
    """Instance pk -> "2 of 4 (backup-12, incremental-13)": the connection slots held
    on its server now, by every job of every cluster; {} when Redis cannot be asked."""
    try:
        redis = queue.redis_connection(queue.DEFAULT)
        return {
            i.pk: slots_usage_text(redis, f"{i.host}:{i.port}", i.max_connections)
            for i in instances
        }
    except queue.QueueUnavailable:
        return {}


def topology_export(*, cluster_name: str | None = None) -> str:
    """The topology file for one or all clusters; passwords never appear, only `password_env`."""
    clusters = (
        Cluster.objects.order_by("name")
        .select_related("drill_instance", "policy")
        .prefetch_related("instances", "shards__instance", "logical_tables")
    )
    if cluster_name is not None:
        clusters = clusters.filter(name=cluster_name)
    documents = []
    for cluster in clusters:
        entry: dict = {"name": cluster.name}
        if cluster.shard_key:
            entry["shard_key"] = cluster.shard_key
        if cluster.description:
            entry["description"] = cluster.description
        entry["instances"] = []
        for instance in cluster.instances.all():
            item = {
                "name": instance.name,
                "host": instance.host,
                "port": instance.port,
                "user": instance.user,
            }
            if instance.password_env:
                item["password_env"] = instance.password_env
            if instance.tls_ca:
                item["tls_ca"] = instance.tls_ca
            if instance.tls_verify:
                item["tls_verify"] = True
            if instance.max_connections != 4:
                item["max_connections"] = instance.max_connections
            if instance.datadir:
                item["datadir"] = instance.datadir
            if instance.agent_queue:
                item["agent_queue"] = instance.agent_queue
            entry["instances"].append(item)
        entry["shards"] = [
            {"name": s.name, "instance": s.instance.name, "database": s.database}
            for s in cluster.shards.all()
        ]
        tables = [{"name": t.name, "pattern": t.pattern} for t in cluster.logical_tables.all()]
        if tables:
            entry["logical_tables"] = tables
        if cluster.drill_instance_id:
            entry["drill_instance"] = cluster.drill_instance.name
        entry["policy"] = _policy_entry(cluster)
        documents.append(entry)
    return dump_topology(documents)


def _policy_entry(cluster) -> dict:
    """Every policy field (the defaults when the cluster has no policy yet)."""
    from backups.models import BackupPolicy  # backups builds on shards, not the reverse
    from backups.selectors.policies import policy_json

    try:
        policy = cluster.policy  # joined by topology_export's select_related
    except BackupPolicy.DoesNotExist:
        policy = BackupPolicy(cluster=cluster)
    doc = policy_json(policy)
    del doc["cluster"]
    return doc


def discovery_report(cluster) -> dict:
    """The `topology discover --json` object (DESIGN.md): shards with tables, and findings."""
    shards = cluster.shards.select_related("instance").prefetch_related("tables").order_by("name")
    return {
        "cluster": cluster.name,
        "shards": [
            {
                "name": shard.name,
                "instance": shard.instance.name,
                "database": shard.database,
                "tables": [
                    {
                        "name": t.name,
                        "engine": t.engine,
                        "rows": t.rows_estimate,
                        "has_primary_key": t.has_primary_key,
                        "data_bytes": t.data_bytes,
                        "index_bytes": t.index_bytes,
                    }
                    for t in shard.tables.all()
                ],
            }
            for shard in shards
        ],
        "findings": [
            {
                "severity": f.severity,
                "instance": f.instance.name if f.instance else None,
                "shard": f.shard.name if f.shard else None,
                "table": f.table or None,
                "message": f.message,
                "code": f.code,
            }
            for f in Finding.objects.filter(cluster=cluster)
            .select_related("instance", "shard")
            .order_by("id")
        ],
    }
