"""Shared test factories: real shard databases on the `mariadb_servers` fixture, and users.

Kept small and stable, other engineers' tests import them:

    cluster = make_cluster(mariadb_servers, name=f"c{unique_name}")
    operator = make_user("operator")
"""

from __future__ import annotations

import uuid

from django.contrib.auth.models import Group, User

from backups.engine.mysql import quote_ident
from console.keys import encrypt_secret
from shards.models import Cluster, Instance, Shard

DEFAULT_TABLES = {"t_order": 20, "t_user": 10}

TABLE_DDL = (
    "CREATE TABLE {table} ("
    " id BIGINT UNSIGNED NOT NULL PRIMARY KEY,"
    " shard VARCHAR(64) NOT NULL,"
    " amount DECIMAL(12,2) NOT NULL,"
    " note VARCHAR(200) NULL,"
    " created_at DATETIME(6) NOT NULL"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
)


def shard_database_name(cluster_name: str, index: int) -> str:
    """The database a factory-made shard lives in: `<cluster>_<NN>` (dots/dashes made `_`)."""
    safe = cluster_name.replace("-", "_").replace(".", "_")
    return f"{safe}_{index:02d}"


def make_cluster(
    servers,
    *,
    name: str | None = None,
    shards_per_instance: int = 1,
    tables: dict[str, int] | None = None,
    max_connections: int = 4,
    password: str = "",
) -> Cluster:
    """Create real shard databases with rows on every server and register them via the ORM.

    `servers` are `mariadb_servers` (or a subset). Each server becomes an Instance named
    after it (`m0`, `m1`, ...) with user root and its password stored encrypted; each gets
    `shards_per_instance` databases `<name>_<NN>` holding `tables` ({table: row count}).
    Rows have ids 1..N, a `shard` column naming their shard, and deterministic values,
    generated on the server (MariaDB's sequence engine) so large tables are fast to build.
    Shards are named `s00`, `s01`, ... in server order.
    """
    name = name or f"c{uuid.uuid4().hex[:8]}"
    tables = DEFAULT_TABLES if tables is None else tables
    cluster = Cluster.objects.create(name=name)
    index = 0
    for server in servers:
        endpoint = server.endpoint
        instance = Instance.objects.create(
            cluster=cluster,
            name=server.name,
            host=endpoint.host,
            port=endpoint.port,
            user=endpoint.user,
            password_encrypted=encrypt_secret(password or endpoint.password),
            max_connections=max_connections,
        )
        for _ in range(shards_per_instance):
            shard_name = f"s{index:02d}"
            database = shard_database_name(name, index)
            statements = [
                f"DROP DATABASE IF EXISTS {quote_ident(database)}",
                f"CREATE DATABASE {quote_ident(database)}",
                f"USE {quote_ident(database)}",
            ]
            for table, rows in tables.items():
                statements.append(TABLE_DDL.format(table=quote_ident(table)))
                if rows:
                    statements.append(
                        f"INSERT INTO {quote_ident(table)} (id, shard, amount, note, created_at)"
                        f" SELECT seq, '{shard_name}', seq * 1.25, CONCAT('row ', seq),"
                        f" TIMESTAMP'2024-01-01 00:00:00' + INTERVAL seq SECOND"
                        f" FROM seq_1_to_{int(rows)}"
                    )
            server.execute(*statements)
            Shard.objects.create(
                cluster=cluster, name=shard_name, instance=instance, database=database
            )
            index += 1
    return cluster


def drop_cluster_databases(cluster: Cluster, servers) -> None:
    """Drop the shard databases a factory created (call from a finaliser if space matters)."""
    by_port = {s.endpoint.port: s for s in servers}
    for shard in cluster.shards.select_related("instance"):
        server = by_port.get(shard.instance.port)
        if server is not None:
            server.execute(f"DROP DATABASE IF EXISTS {quote_ident(shard.database)}")


def make_user(role: str | None, username: str | None = None, password: str = "pw") -> User:
    """A user holding `role` (operator, approver, auditor, admin) or no role at all (None)."""
    username = username or f"{role or 'norole'}-{uuid.uuid4().hex[:6]}"
    user = User.objects.create_user(username=username, password=password)
    if role:
        group, _ = Group.objects.get_or_create(name=role)
        user.groups.add(group)
    return user
