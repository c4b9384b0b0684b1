"""Topology edits: clusters, the instances (servers) they span, and their shards.

Every change writes an audit event in the same transaction. Actors are Users
(checked against their role here, not only in views) or a system name such as
"cli" or "worker" for commands and jobs, which run with the machine's authority.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from backups.engine.errors import KeyMaterialError
from backups.engine.mysql import (
    Endpoint,
    control_character_refusal,
    host_refusal,
    password_env_refusal,
)
from console.audit import audit_record
from console.keys import decrypt_secret, encrypt_secret
from console.roles import OPERATOR, require_role
from shards import discovery as discovery_engine
from shards.models import NAME_VALIDATOR, RESERVED_CLUSTER_NAMES, Cluster, Instance, Shard


class TopologyError(Exception):
    """Bad topology input; the message is one sentence for a person.

    `field` names the form field at fault (None: the input as a whole), so pages can show
    the sentence beside it.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


def topology_authorise(actor, action: str) -> None:
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


def cluster_name_check(name: str) -> str:
    """Refuse the names reserved for storage prefixes that are not clusters'."""
    if name.lower() in RESERVED_CLUSTER_NAMES:
        raise TopologyError(
            f"cluster name '{name}' is reserved (storage keeps flashback SQL under "
            f"'{name.lower()}/'); choose another name",
            field="name",
        )
    return name


def cluster_create(*, actor, name: str, shard_key: str = "", description: str = "") -> Cluster:
    """Create an empty cluster. Refuses a taken or malformed name."""
    topology_authorise(actor, "create clusters")
    name = cluster_name_check(_valid_name(name, "cluster name"))
    with transaction.atomic():
        if Cluster.objects.filter(name=name).exists():
            raise TopologyError(f"a cluster named '{name}' already exists", field="name")
        cluster = Cluster.objects.create(name=name, shard_key=shard_key, description=description)
        audit_record(actor=actor, action="cluster.create", obj=cluster, details={"name": name})
    return cluster


def cluster_update(*, actor, cluster: Cluster, shard_key: str, description: str) -> Cluster:
    topology_authorise(actor, "change clusters")
    with transaction.atomic():
        cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
        cluster_change(
            actor=actor,
            cluster=cluster,
            values={"shard_key": shard_key, "description": description},
        )
    return cluster


def cluster_change(*, actor, cluster: Cluster, values: dict) -> bool:
    """Save and audit the changed fields of a cluster the caller has locked; True if any."""
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


def instance_password_apply(*, instance: Instance, password: str | None, password_env: str) -> dict:
    """Set (not save) the instance's password or password variable; `password=None` keeps the
    stored one. Returns audit-safe changes: never the secret, only that it changed.

    Refuses a `password_env` outside SHARDVAULT_PASSWORD_ENV_PATTERN or naming one of the
    console's own variables, and a password holding a control character."""
    changes = {}
    if password_env:
        refused = password_env_refusal(password_env, settings.SHARDVAULT_PASSWORD_ENV_PATTERN)
        if refused:
            raise TopologyError(f"instance {instance.name}: {refused}", field="password_env")
    problem = control_character_refusal(password, "password")
    if problem:
        raise TopologyError(f"instance {instance.name}: {problem}", field="password")
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
    datadir: str = "",
    agent_queue: str = "",
) -> Instance:
    """Register a server of the cluster; the password is stored encrypted, never shown again."""
    topology_authorise(actor, "add instances")
    name = _valid_name(name, "instance name")
    values = _instance_fields(
        host=host,
        port=port,
        user=user,
        tls_ca=tls_ca,
        tls_verify=tls_verify,
        max_connections=max_connections,
        datadir=datadir,
        agent_queue=agent_queue,
    )
    if not values["host"]:
        raise TopologyError("the host must not be empty", field="host")
    if not values["user"]:
        raise TopologyError("the user must not be empty", field="user")
    with transaction.atomic():
        Cluster.objects.select_for_update().get(pk=cluster.pk)
        if cluster.instances.filter(name=name).exists():
            raise TopologyError(
                f"cluster {cluster.name} already has an instance named '{name}'", field="name"
            )
        instance = Instance(cluster=cluster, name=name, **values)
        instance_password_apply(
            instance=instance, password=password or "", password_env=password_env
        )
        instance.save()
        audit_record(
            actor=actor,
            action="instance.create",
            obj=instance,
            details={
                "cluster": cluster.name,
                "host": instance.host,
                "port": instance.port,
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
    datadir: str = "",
    agent_queue: str = "",
) -> Instance:
    """Change an instance; `password=None` (or blank from a form) keeps the stored one."""
    topology_authorise(actor, "change instances")
    values = _instance_fields(
        host=host,
        port=port,
        user=user,
        tls_ca=tls_ca,
        tls_verify=tls_verify,
        max_connections=max_connections,
        datadir=datadir,
        agent_queue=agent_queue,
    )
    with transaction.atomic():
        instance = Instance.objects.select_for_update().get(pk=instance.pk)
        instance_change(
            actor=actor,
            instance=instance,
            values=values,
            password=password,
            password_env=password_env,
        )
    return instance


def _instance_fields(
    *,
    host: str,
    port,
    user: str,
    tls_ca: str,
    tls_verify: bool,
    max_connections: int,
    datadir: str = "",
    agent_queue: str = "",
) -> dict:
    """An instance's connection fields as stored: host and user stripped, the port checked."""
    port = _valid_port(port)
    values = {
        "host": host.strip(),
        "port": port,
        "user": user.strip(),
        "tls_ca": tls_ca,
        "tls_verify": tls_verify,
        "max_connections": max_connections,
        "datadir": (datadir or "").strip(),
        "agent_queue": (agent_queue or "").strip(),
    }
    instance_connection_fields_check(values)
    return values


def instance_connection_fields_check(values: dict) -> None:
    """Refuses a host that is neither a host name nor an IP address, and a control character
    (a newline would add options to a client option file) in any connection field."""
    if values.get("host"):
        problem = host_refusal(values["host"])
        if problem:
            raise TopologyError(problem, field="host")
    for key, what in (("user", "user"), ("tls_ca", "TLS CA path")):
        problem = control_character_refusal(values.get(key), what)
        if problem:
            raise TopologyError(problem, field=key)


def _stored_password_stays_with_its_server(
    instance: Instance, values: dict, password: str | None, password_env: str
) -> None:
    """A stored password is only ever sent to the host, port and user it was stored for: a change
    of any of them without the password (or a password variable) given again is refused."""
    if password is not None or password_env or not instance.password_encrypted:
        return
    moved = [
        key
        for key in ("host", "port", "user")
        if key in values and values[key] != getattr(instance, key)
    ]
    if moved:
        raise TopologyError(
            f"instance {instance.name}: changing its {' and '.join(moved)} needs the password "
            "again, because a stored password is only sent to the server and user it was stored for",
            field="password",
        )


def instance_change(
    *, actor, instance: Instance, values: dict, password: str | None, password_env: str
) -> bool:
    """Save and audit the changed fields (and password) of an instance the caller has locked;
    True if any."""
    _stored_password_stays_with_its_server(instance, values, password, password_env)
    changes = _apply(instance, values)
    changes.update(
        instance_password_apply(instance=instance, password=password, password_env=password_env)
    )
    if instance.identity and (password is not None or password_env):
        # The password given again vouches for the server now at the address: the next
        # drill records its identity anew (shards/services/identity.py).
        instance.identity = instance.identity_address = ""
        changes["identity"] = "cleared"
    if changes:
        instance.save()
        audit_record(actor=actor, action="instance.update", obj=instance, details=changes)
    return bool(changes)


def instance_connection_test(
    *, actor, endpoint: Endpoint, databases: list[str] | None = None
) -> tuple[bool, str]:
    """Try to connect (and open the given databases); returns (ok, one sentence)."""
    topology_authorise(actor, "test connections")
    return discovery_engine.connection_check(endpoint, databases)


# --- shards ----------------------------------------------------------------------------


def shard_create(*, actor, cluster: Cluster, name: str, instance: Instance, database: str) -> Shard:
    """Add a shard: one database on one instance of the same cluster."""
    topology_authorise(actor, "add shards")
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
    topology_authorise(actor, "change shards")
    database = _valid_shard_target(
        instance=instance,
        database=database,
        cluster_id=shard.cluster_id,
        cluster="this shard's cluster",
    )
    with transaction.atomic():
        shard = Shard.objects.select_for_update().get(pk=shard.pk)
        _require_database_free(instance=instance, database=database, shard=shard)
        shard_change(actor=actor, shard=shard, instance=instance, database=database)
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


def shard_change(*, actor, shard: Shard, instance: Instance, database: str) -> bool:
    """Save and audit the new place of a shard the caller has locked; True if it moved. Its tables describe the
    old database, so they go (the next discovery lists the new one's)."""
    changes = _apply(shard, {"instance": instance, "database": database})
    if changes:
        shard.save()
        shard.tables.all().delete()
        audit_record(actor=actor, action="shard.update", obj=shard, details=changes)
    return bool(changes)
