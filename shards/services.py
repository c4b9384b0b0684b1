"""Topology writes: clusters, instances, shards, the topology file, discovery runs.

Every change writes an audit event in the same transaction. Actors are Users
(checked against their role here, not only in views) or a system name such as
"cli" or "worker" for commands and jobs, which run with the machine's authority.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from django.utils import timezone

from backups import queue
from backups.engine.errors import KeyMaterialError
from backups.engine.mysql import Endpoint
from console.audit import audit_record
from console.keys import decrypt_secret, encrypt_secret
from console.roles import OPERATOR, require_role
from shards import discovery as discovery_engine
from shards.models import (
    NAME_VALIDATOR,
    Cluster,
    DiscoveryRun,
    Finding,
    Instance,
    LogicalTable,
    PhysicalTable,
    Shard,
)
from shards.selectors import MissingPassword, instance_endpoint
from shards.topology_file import ClusterSpec, TopologyDocument

# A queued or running discovery older than this is considered abandoned.
DISCOVERY_STALE_AFTER = timedelta(minutes=15)


class TopologyError(Exception):
    """Bad topology input; the message is one sentence for a person.

    `field` names the form field at fault (None: the input as a whole), so pages can show
    the sentence beside it.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


def _authorise(actor, action: str) -> None:
    if hasattr(actor, "pk"):
        require_role(actor, OPERATOR, action=action)


def _valid_name(value: str, what: str) -> str:
    value = (value or "").strip()
    try:
        NAME_VALIDATOR(value)
    except ValidationError:
        raise TopologyError(
            f"{what} '{value}' is not valid: use letters, digits, '_', '.' or '-' "
            "(at most 63, starting with a letter or digit)",
            field="name",
        ) from None
    return value


def _valid_port(port) -> int:
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise TopologyError(f"port '{port}' is not a number", field="port") from None
    if not 1 <= port <= 65535:
        raise TopologyError(f"port {port} is out of range: use 1 to 65535", field="port")
    return port


# --- clusters --------------------------------------------------------------------------


def cluster_create(*, actor, name: str, shard_key: str = "", description: str = "") -> Cluster:
    """Create an empty cluster. Refuses a taken or malformed name."""
    _authorise(actor, "create clusters")
    name = _valid_name(name, "cluster name")
    with transaction.atomic():
        if Cluster.objects.filter(name=name).exists():
            raise TopologyError(f"a cluster named '{name}' already exists", field="name")
        cluster = Cluster.objects.create(name=name, shard_key=shard_key, description=description)
        audit_record(actor=actor, action="cluster.create", obj=cluster, details={"name": name})
    return cluster


def cluster_update(*, actor, cluster: Cluster, shard_key: str, description: str) -> Cluster:
    _authorise(actor, "change clusters")
    with transaction.atomic():
        cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
        _cluster_change(actor, cluster, {"shard_key": shard_key, "description": description})
    return cluster


def _cluster_change(actor, cluster: Cluster, values: dict) -> bool:
    """Save and audit the changed fields of a locked cluster; True if anything changed."""
    changes = _apply(cluster, values)
    if changes:
        cluster.save()
        audit_record(actor=actor, action="cluster.update", obj=cluster, details=changes)
    return bool(changes)


def _apply(obj, values: dict) -> dict:
    """Set changed fields; returns {field: [old, new]} for the audit log."""
    changes = {}
    for key, value in values.items():
        old = getattr(obj, key)
        old_cmp = old.pk if hasattr(old, "pk") else old
        new_cmp = value.pk if hasattr(value, "pk") else value
        if old_cmp != new_cmp:
            changes[key] = [
                str(old_cmp) if old_cmp is not None else None,
                str(new_cmp) if new_cmp is not None else None,
            ]
            setattr(obj, key, value)
    return changes


# --- instances -------------------------------------------------------------------------


def _password_fields(instance: Instance, password: str | None, password_env: str) -> dict:
    """Audit-safe password changes: never the secret, only that it changed."""
    changes = {}
    if password_env:
        if instance.password_env != password_env:
            changes["password_env"] = [instance.password_env, password_env]
            instance.password_env = password_env
        if instance.password_encrypted:
            instance.password_encrypted = ""
            changes["password"] = "cleared"
    elif password is not None:
        try:
            current = decrypt_secret(instance.password_encrypted)
        except KeyMaterialError:
            current = None  # stored under another data key: the new password replaces it
        if current != password or instance.password_env:
            instance.password_encrypted = encrypt_secret(password)
            changes["password"] = "changed"
        if instance.password_env:
            changes["password_env"] = [instance.password_env, ""]
            instance.password_env = ""
    return changes


def instance_create(
    *,
    actor,
    cluster: Cluster,
    name: str,
    host: str,
    port: int = 3306,
    user: str,
    password: str = "",
    password_env: str = "",
    tls_ca: str = "",
    tls_verify: bool = False,
    max_connections: int = 4,
) -> Instance:
    """Register a server of the cluster; the password is stored encrypted, never shown again."""
    _authorise(actor, "add instances")
    name = _valid_name(name, "instance name")
    port = _valid_port(port)
    if not host.strip():
        raise TopologyError("the host must not be empty", field="host")
    if not user.strip():
        raise TopologyError("the user must not be empty", field="user")
    with transaction.atomic():
        Cluster.objects.select_for_update().get(pk=cluster.pk)
        if cluster.instances.filter(name=name).exists():
            raise TopologyError(
                f"cluster {cluster.name} already has an instance named '{name}'", field="name"
            )
        instance = Instance(
            cluster=cluster,
            name=name,
            host=host.strip(),
            port=port,
            user=user.strip(),
            tls_ca=tls_ca,
            tls_verify=tls_verify,
            max_connections=max_connections,
        )
        _password_fields(instance, password or "", password_env)
        instance.save()
        audit_record(
            actor=actor,
            action="instance.create",
            obj=instance,
            details={
                "cluster": cluster.name,
                "host": instance.host,
                "port": port,
                "user": instance.user,
            },
        )
    return instance


def instance_update(
    *,
    actor,
    instance: Instance,
    host: str,
    port: int,
    user: str,
    password: str | None = None,
    password_env: str = "",
    tls_ca: str = "",
    tls_verify: bool = False,
    max_connections: int = 4,
) -> Instance:
    """Change an instance; `password=None` (or blank from a form) keeps the stored one."""
    _authorise(actor, "change instances")
    port = _valid_port(port)
    with transaction.atomic():
        instance = Instance.objects.select_for_update().get(pk=instance.pk)
        _instance_change(
            actor,
            instance,
            {
                "host": host.strip(),
                "port": port,
                "user": user.strip(),
                "tls_ca": tls_ca,
                "tls_verify": tls_verify,
                "max_connections": max_connections,
            },
            password=password,
            password_env=password_env,
        )
    return instance


def _instance_change(
    actor, instance: Instance, values: dict, *, password: str | None, password_env: str
) -> bool:
    """Save and audit the changed fields (and password) of a locked instance; True if any."""
    changes = _apply(instance, values)
    changes.update(_password_fields(instance, password, password_env))
    if changes:
        instance.save()
        audit_record(actor=actor, action="instance.update", obj=instance, details=changes)
    return bool(changes)


def instance_connection_test(
    *, actor, endpoint: Endpoint, databases: list[str] | None = None
) -> tuple[bool, str]:
    """Try to connect (and open the given databases); returns (ok, one sentence)."""
    _authorise(actor, "test connections")
    return discovery_engine.connection_check(endpoint, databases)


# --- shards ----------------------------------------------------------------------------


def shard_create(*, actor, cluster: Cluster, name: str, instance: Instance, database: str) -> Shard:
    """Add a shard: one database on one instance of the same cluster."""
    _authorise(actor, "add shards")
    name = _valid_name(name, "shard name")
    database = _valid_shard_target(
        instance=instance,
        database=database,
        cluster_id=cluster.pk,
        cluster=f"cluster {cluster.name}",
    )
    with transaction.atomic():
        Cluster.objects.select_for_update().get(pk=cluster.pk)
        if cluster.shards.filter(name=name).exists():
            raise TopologyError(
                f"cluster {cluster.name} already has a shard named '{name}'", field="name"
            )
        _require_database_free(instance=instance, database=database)
        shard = Shard.objects.create(
            cluster=cluster, name=name, instance=instance, database=database
        )
        audit_record(
            actor=actor,
            action="shard.create",
            obj=shard,
            details={"cluster": cluster.name, "instance": instance.name, "database": database},
        )
    return shard


def shard_update(*, actor, shard: Shard, instance: Instance, database: str) -> Shard:
    _authorise(actor, "change shards")
    database = _valid_shard_target(
        instance=instance,
        database=database,
        cluster_id=shard.cluster_id,
        cluster="this shard's cluster",
    )
    with transaction.atomic():
        shard = Shard.objects.select_for_update().get(pk=shard.pk)
        _require_database_free(instance=instance, database=database, shard=shard)
        _shard_change(actor, shard, instance=instance, database=database)
    return shard


def _valid_shard_target(*, instance: Instance, database: str, cluster_id: int, cluster: str) -> str:
    """The stripped database name; refuses a malformed one or an instance of another cluster
    (`cluster` names the shard's cluster in the sentence)."""
    database = database.strip()
    if not database or len(database) > 64:
        raise TopologyError("the database name must have 1 to 64 characters", field="database")
    if instance.cluster_id != cluster_id:
        raise TopologyError(
            f"instance {instance.name} does not belong to {cluster}", field="instance"
        )
    return database


def _require_database_free(*, instance: Instance, database: str, shard: Shard | None = None):
    """Refuses a database that is already a shard (other than `shard`) on the instance."""
    taken = Shard.objects.filter(instance=instance, database=database)
    if shard is not None:
        taken = taken.exclude(pk=shard.pk)
    if taken.exists():
        raise TopologyError(
            f"database '{database}' on instance {instance.name} is already a shard",
            field="database",
        )


def _shard_change(actor, shard: Shard, *, instance: Instance, database: str) -> bool:
    """Save and audit a locked shard's new place; True if it moved. Its tables describe the
    old database, so they go (the next discovery lists the new one's)."""
    changes = _apply(shard, {"instance": instance, "database": database})
    if changes:
        shard.save()
        shard.tables.all().delete()
        audit_record(actor=actor, action="shard.update", obj=shard, details=changes)
    return bool(changes)


# --- the topology file -----------------------------------------------------------------


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
    _authorise(actor, "import topology")
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
        cluster = Cluster.objects.create(
            name=spec.name, shard_key=spec.shard_key, description=spec.description
        )
        summary.created.append(f"cluster {spec.name}")
        audit_record(
            actor=actor, action="cluster.create", obj=cluster, details={"source": "import"}
        )
    elif _cluster_change(
        actor, cluster, {"shard_key": spec.shard_key, "description": spec.description}
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
        }
        if instance is None:
            instance = Instance(cluster=cluster, name=ispec.name, **values)
            _password_fields(instance, ispec.password or "", ispec.password_env)
            instance.save()
            instances[ispec.name] = instance
            summary.created.append(f"instance {spec.name}/{ispec.name}")
            audit_record(
                actor=actor,
                action="instance.create",
                obj=instance,
                details={"source": "import", **values},
            )
        elif _instance_change(
            actor, instance, values, password=ispec.password, password_env=ispec.password_env
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
        elif _shard_change(actor, shard, instance=instance, database=sspec.database):
            summary.updated.append(f"shard {spec.name}/{sspec.name}")

    drill = instances[spec.drill_instance] if spec.drill_instance else None
    if _cluster_change(actor, cluster, {"drill_instance": drill}):
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
            changes = _apply(table, {"pattern": tspec.pattern})
            table.save()
            summary.updated.append(f"logical table {spec.name}/{tspec.name}")
            audit_record(actor=actor, action="logical_table.update", obj=table, details=changes)
    for name, table in sorted(tables.items()):
        if name not in wanted_tables:
            _delete(actor, table, f"logical table {spec.name}/{name}", summary)


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


# --- discovery -------------------------------------------------------------------------


def discovery_request(*, cluster: Cluster, actor) -> DiscoveryRun:
    """Queue a discovery of the cluster on the `default` RQ queue (job id `discover-<id>`).

    While a discovery of this cluster is pending or running, returns that one instead.
    """
    _authorise(actor, "run discovery")
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
            job_id=f"discover-{run.pk}",
            timeout=600,
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
        _authorise(actor, "run discovery")
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
        except (
            MissingPassword,
            KeyMaterialError,
        ) as exc:  # a key that cannot decrypt is a finding too
            unavailable[instance.name] = str(exc)
    targets = [discovery_engine.ShardTarget(s.name, s.instance.name, s.database) for s in shards]

    last_write = [0.0]

    def progress(percent: int, text: str) -> None:
        now = timezone.now().timestamp()
        if percent < 100 and now - last_write[0] < 0.5:
            return
        last_write[0] = now
        DiscoveryRun.objects.filter(pk=run.pk).update(progress=percent, progress_text=text[:200])

    try:
        result = discovery_engine.discover(
            endpoints, targets, progress=progress, unavailable=unavailable
        )
    except Exception as exc:
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
