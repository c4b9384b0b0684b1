"""The topology file: make the clusters it lists match it, all or nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db import IntegrityError, transaction
from django.db.models import ProtectedError

from backups.services.policies import PolicyInvalid, policy_update
from console.audit import audit_record
from console.roles import RoleDenied
from shards.models import Cluster, Instance, LogicalTable, Shard
from shards.services.topology import (
    TopologyError,
    cluster_change,
    cluster_name_check,
    instance_change,
    instance_connection_fields_check,
    instance_password_apply,
    shard_change,
    topology_authorise,
)
from shards.topology_file import ClusterSpec, TopologyDocument


@dataclass
class ImportSummary:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)

    def as_text(self) -> str:
        if not self.changed:
            return "no changes"
        parts = []
        for label, items in (
            ("created", self.created),
            ("updated", self.updated),
            ("deleted", self.deleted),
        ):
            if items:
                parts.append(f"{label} {len(items)}: {', '.join(items)}")
        return "; ".join(parts)


def topology_import(*, actor, document: TopologyDocument) -> ImportSummary:
    """Make the listed clusters match the file, all or nothing.

    Idempotent: importing the same file twice changes nothing the second time.
    Instances, shards and logical tables of a listed cluster that the file no
    longer names are removed (refused if backups still refer to them). Clusters
    the file does not list are left alone. An instance without `password` or
    `password_env` keeps its stored password.
    """
    topology_authorise(actor, "import topology")
    summary = ImportSummary()
    try:
        with transaction.atomic():
            for spec in document.clusters:
                _import_cluster(actor, spec, summary)
    except IntegrityError as exc:
        raise TopologyError(f"the file conflicts with the stored topology ({exc})") from None
    return summary


def _import_cluster(actor, spec: ClusterSpec, summary: ImportSummary) -> None:
    cluster = Cluster.objects.select_for_update().filter(name=spec.name).first()
    if cluster is None:
        cluster_name_check(spec.name)
        cluster = Cluster.objects.create(
            name=spec.name, shard_key=spec.shard_key, description=spec.description
        )
        summary.created.append(f"cluster {spec.name}")
        audit_record(
            actor=actor, action="cluster.create", obj=cluster, details={"source": "import"}
        )
    elif cluster_change(
        actor=actor,
        cluster=cluster,
        values={"shard_key": spec.shard_key, "description": spec.description},
    ):
        summary.updated.append(f"cluster {spec.name}")

    instances = {i.name: i for i in cluster.instances.select_for_update()}
    for ispec in spec.instances:
        instance = instances.get(ispec.name)
        values = {
            "host": ispec.host,
            "port": ispec.port,
            "user": ispec.user,
            "tls_ca": ispec.tls_ca,
            "tls_verify": ispec.tls_verify,
            "max_connections": ispec.max_connections,
            "datadir": ispec.datadir,
            "agent_queue": ispec.agent_queue,
        }
        try:
            instance_connection_fields_check(values)
        except TopologyError as exc:
            raise TopologyError(f"instance {spec.name}/{ispec.name}: {exc}") from None
        if instance is None:
            instance = Instance(cluster=cluster, name=ispec.name, **values)
            instance_password_apply(
                instance=instance, password=ispec.password or "", password_env=ispec.password_env
            )
            instance.save()
            instances[ispec.name] = instance
            summary.created.append(f"instance {spec.name}/{ispec.name}")
            audit_record(
                actor=actor,
                action="instance.create",
                obj=instance,
                details={"source": "import", **values},
            )
        elif instance_change(
            actor=actor,
            instance=instance,
            values=values,
            password=ispec.password,
            password_env=ispec.password_env,
        ):
            summary.updated.append(f"instance {spec.name}/{ispec.name}")

    wanted_shards = {s.name for s in spec.shards}
    shards = {s.name: s for s in cluster.shards.select_for_update()}
    # Remove dropped shards first so a database can move from one shard name to another.
    for name, shard in sorted(shards.items()):
        if name not in wanted_shards:
            _delete(actor, shard, f"shard {spec.name}/{name}", summary)
    for sspec in spec.shards:
        shard = shards.get(sspec.name)
        instance = instances[sspec.instance]
        if shard is None:
            shard = Shard.objects.create(
                cluster=cluster, name=sspec.name, instance=instance, database=sspec.database
            )
            summary.created.append(f"shard {spec.name}/{sspec.name}")
            audit_record(
                actor=actor,
                action="shard.create",
                obj=shard,
                details={"source": "import", "instance": instance.name, "database": sspec.database},
            )
        elif shard_change(actor=actor, shard=shard, instance=instance, database=sspec.database):
            summary.updated.append(f"shard {spec.name}/{sspec.name}")

    drill = instances[spec.drill_instance] if spec.drill_instance else None
    if cluster_change(actor=actor, cluster=cluster, values={"drill_instance": drill}):
        summary.updated.append(f"cluster {spec.name}")

    wanted_instances = {i.name for i in spec.instances}
    for name, instance in sorted(instances.items()):
        if name not in wanted_instances:
            _delete(actor, instance, f"instance {spec.name}/{name}", summary)

    tables = {t.name: t for t in cluster.logical_tables.select_for_update()}
    wanted_tables = {t.name for t in spec.logical_tables}
    for tspec in spec.logical_tables:
        table = tables.get(tspec.name)
        if table is None:
            table = LogicalTable.objects.create(
                cluster=cluster, name=tspec.name, pattern=tspec.pattern
            )
            summary.created.append(f"logical table {spec.name}/{tspec.name}")
            audit_record(
                actor=actor,
                action="logical_table.create",
                obj=table,
                details={"pattern": tspec.pattern},
            )
        elif table.pattern != tspec.pattern:
            changes = {"pattern": [table.pattern, tspec.pattern]}
            table.pattern = tspec.pattern
            table.save()
            summary.updated.append(f"logical table {spec.name}/{tspec.name}")
            audit_record(actor=actor, action="logical_table.update", obj=table, details=changes)
    for name, table in sorted(tables.items()):
        if name not in wanted_tables:
            _delete(actor, table, f"logical table {spec.name}/{name}", summary)

    if spec.policy is not None:
        _import_policy(actor, cluster, spec, summary)


def _import_policy(actor, cluster: Cluster, spec: ClusterSpec, summary: ImportSummary) -> None:
    """Apply only the fields the cluster's `policy:` block names (the same values: no change)."""
    try:
        _policy, diff = policy_update(
            cluster=cluster, actor=actor, changes=spec.policy, source="import"
        )
    except PolicyInvalid as exc:
        raise TopologyError(f"cluster '{spec.name}' policy: {exc}") from None
    except RoleDenied:
        raise TopologyError(
            f"cluster '{spec.name}' policy: only an admin may change a backup policy"
        ) from None
    if diff:
        summary.updated.append(f"policy {spec.name}")


def _delete(actor, obj, label: str, summary: ImportSummary) -> None:
    action = f"{obj._meta.model_name.replace('logicaltable', 'logical_table')}.delete"
    audit_record(actor=actor, action=action, obj=obj, details={"source": "import"})
    try:
        with transaction.atomic():
            obj.delete()
    except ProtectedError:
        raise TopologyError(
            f"{label} cannot be removed: backups or shards still refer to it"
        ) from None
    summary.deleted.append(label)
