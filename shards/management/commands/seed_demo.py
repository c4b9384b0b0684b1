"""`manage.py seed_demo`: a demo cluster on the local MariaDB and one demo user per role.

Idempotent: databases and tables are created if missing, rows inserted once,
the cluster imported (no changes the second time), users created if missing.
"""

from __future__ import annotations

import pymysql
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from backups.engine.errors import ConnectError
from backups.engine.mysql import Endpoint, connect, quote_ident, quote_qualified
from console.services import UserError, user_create
from shards.models import Cluster
from shards.services.discovery_runs import discovery_run
from shards.services.topology import TopologyError
from shards.services.topology_import import topology_import
from shards.topology_file import (
    ClusterSpec,
    InstanceSpec,
    LogicalTableSpec,
    ShardSpec,
    TopologyDocument,
)

DEMO_CLUSTER = "demo"
DEMO_SHARDS = 4
DEMO_DATABASE = "shardvault_demo_{:02d}"
# Known demo logins, printed by `manage.py demo_logins`. Development only.
DEMO_USERS = [
    ("operator", "operator", "operator-demo-1"),
    ("approver", "approver", "approver-demo-1"),
    ("approver2", "approver", "approver2-demo-1"),
    ("auditor", "auditor", "auditor-demo-1"),
    ("admin", "admin", "admin-demo-1"),
]
ROWS_PER_TABLE = 500


class Command(BaseCommand):
    help = "Create the demo databases on the local MariaDB, register them as cluster 'demo', add demo users."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=3306)
        parser.add_argument("--user", default="root")
        parser.add_argument(
            "--force",
            action="store_true",
            help="seed even though DEBUG is off (creates accounts with known passwords)",
        )

    def handle(self, *args, host: str, port: int, user: str, force: bool = False, **options):
        if not settings.DEBUG and not force:
            # The demo users have published passwords: never by accident on a real console.
            raise CommandError(
                "seed_demo creates accounts with known passwords and runs only with "
                "SHARDVAULT_DEBUG=1 or --force"
            )
        endpoint = Endpoint(name="local", host=host, port=port, user=user, password="")
        try:
            self._create_databases(endpoint)
        except ConnectError as exc:
            raise CommandError(f"cannot seed the demo: {exc}") from None
        except pymysql.MySQLError as exc:
            raise CommandError(
                f"cannot seed the demo: {endpoint.name} ({endpoint.address}) refused: {exc.args[-1]}"
            ) from None
        document = TopologyDocument(
            clusters=[
                ClusterSpec(
                    name=DEMO_CLUSTER,
                    shard_key="user_id",
                    description="Demo: four shards on the local MariaDB",
                    instances=[
                        InstanceSpec(name="local", host=host, port=port, user=user, password="")
                    ],
                    shards=[
                        ShardSpec(
                            name=f"s{n:02d}", instance="local", database=DEMO_DATABASE.format(n)
                        )
                        for n in range(DEMO_SHARDS)
                    ],
                    logical_tables=[
                        LogicalTableSpec(name="t_order", pattern="t_order_[0-9]+"),
                        LogicalTableSpec(name="t_user", pattern="t_user_[0-9]+"),
                    ],
                )
            ]
        )
        try:
            summary = topology_import(actor="seed_demo", document=document)
        except TopologyError as exc:
            raise CommandError(f"cannot register the demo cluster: {exc}") from None
        self.stdout.write(f"cluster {DEMO_CLUSTER}: {summary.as_text()}")
        run = discovery_run(cluster=Cluster.objects.get(name=DEMO_CLUSTER), actor="seed_demo")
        self.stdout.write(f"discovery: {run.progress_text}")
        for username, role, password in DEMO_USERS:
            if User.objects.filter(username=username).exists():
                continue
            try:
                user_create(username=username, role=role, password=password, actor="seed_demo")
            except UserError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"user {username} ({role}) created")

    def _create_databases(self, endpoint: Endpoint) -> None:
        conn = connect(endpoint)
        try:
            with conn.cursor() as cur:
                for n in range(DEMO_SHARDS):
                    database = DEMO_DATABASE.format(n)
                    cur.execute(
                        f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)} CHARACTER SET utf8mb4"
                    )
                    # The seq_1_to_N sequence tables live in the current database.
                    cur.execute(f"USE {quote_ident(database)}")
                    # Two order and two user tables per shard: t_order_0..7, t_user_0..7.
                    for t in (2 * n, 2 * n + 1):
                        orders = quote_qualified(database, f"t_order_{t}")
                        users = quote_qualified(database, f"t_user_{t}")
                        cur.execute(
                            f"CREATE TABLE IF NOT EXISTS {orders} (id BIGINT PRIMARY KEY, "
                            "user_id BIGINT NOT NULL, amount DECIMAL(12,2) NOT NULL, "
                            "status VARCHAR(16) NOT NULL, created_at DATETIME(6) NOT NULL, "
                            "KEY (user_id)) ENGINE=InnoDB"
                        )
                        cur.execute(
                            f"CREATE TABLE IF NOT EXISTS {users} (id BIGINT PRIMARY KEY, "
                            "name VARCHAR(100) NOT NULL, email VARCHAR(200), "
                            "created_at DATETIME(6) NOT NULL) ENGINE=InnoDB"
                        )
                        cur.execute(
                            f"INSERT IGNORE INTO {users} (id, name, email, created_at) "  # noqa: S608
                            "SELECT seq, CONCAT('user ', seq), CONCAT('u', seq, '@example.test'), "
                            "TIMESTAMP('2026-01-01') + INTERVAL seq MINUTE FROM seq_1_to_%s",
                            (ROWS_PER_TABLE,),
                        )
                        cur.execute(
                            f"INSERT IGNORE INTO {orders} (id, user_id, amount, status, created_at) "  # noqa: S608
                            "SELECT seq, 1 + seq %% %s, (seq * 37 %% 10000) / 100, "
                            "ELT(1 + seq %% 3, 'new', 'paid', 'shipped'), "
                            "TIMESTAMP('2026-01-01') + INTERVAL seq SECOND FROM seq_1_to_%s",
                            (ROWS_PER_TABLE, ROWS_PER_TABLE * 4),
                        )
                    if n == DEMO_SHARDS - 1:
                        # A legacy table that preflight points out (no primary key). It is
                        # InnoDB so the demo cluster can be backed up (hot backups refuse
                        # other engines); demos seeded before this was MyISAM are converted.
                        legacy = quote_qualified(database, "t_legacy_log")
                        cur.execute(
                            f"CREATE TABLE IF NOT EXISTS {legacy} (at DATETIME NOT NULL, "
                            "message VARCHAR(200) NOT NULL) ENGINE=InnoDB"
                        )
                        cur.execute(
                            "SELECT ENGINE FROM information_schema.TABLES "
                            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 't_legacy_log'",
                            (database,),
                        )
                        if (cur.fetchone() or ("InnoDB",))[0] != "InnoDB":
                            cur.execute(f"ALTER TABLE {legacy} ENGINE=InnoDB")
                    cur.execute(f"ANALYZE TABLE {quote_qualified(database, f't_order_{2 * n}')}")
                    cur.fetchall()
        finally:
            conn.close()
