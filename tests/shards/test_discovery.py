"""Discovery and preflight on real MariaDB servers."""

from __future__ import annotations

import io
import json
import time

import pytest
from django.core.management import call_command

from backups.engine.mysql import quote_ident
from shards.discovery import parse_grants
from shards.models import Cluster, Finding, Instance, PhysicalTable
from shards.services.discovery_runs import discovery_run
from tests.servers import free_port
from tests.shards.conftest import topology_yaml

pytestmark = pytest.mark.django_db

WEIRD = "we`ird näme 表"


def _import(tmp_path, text: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    call_command("topology", "import", str(path), stdout=io.StringIO())


def _discover_json(cluster: str) -> tuple[dict, int]:
    out = io.StringIO()
    code = 0
    try:
        call_command("topology", "discover", cluster, "--json", stdout=out, stderr=io.StringIO())
    except SystemExit as exc:
        code = exc.code
    return json.loads(out.getvalue()), code


@pytest.fixture
def shard_databases(mariadb_servers, unique_name):
    """Two shard databases on two servers with an odd table name, a MyISAM table, a table without PK."""
    s0, s1 = mariadb_servers[0], mariadb_servers[1]
    db0, db1 = f"disc_{unique_name}_00", f"disc_{unique_name}_01"
    s0.execute(
        f"CREATE DATABASE {quote_ident(db0)}",
        f"CREATE TABLE {quote_ident(db0)}.t_order_0 (id INT PRIMARY KEY, v INT) ENGINE=InnoDB",
        f"INSERT INTO {quote_ident(db0)}.t_order_0 SELECT seq, seq FROM mysql.seq_1_to_100",
        f"CREATE TABLE {quote_ident(db0)}.{quote_ident(WEIRD)} (id INT PRIMARY KEY) ENGINE=InnoDB",
        f"ANALYZE TABLE {quote_ident(db0)}.t_order_0",
    )
    s1.execute(
        f"CREATE DATABASE {quote_ident(db1)}",
        f"CREATE TABLE {quote_ident(db1)}.t_order_1 (id INT PRIMARY KEY) ENGINE=InnoDB",
        f"CREATE TABLE {quote_ident(db1)}.legacy (id INT PRIMARY KEY) ENGINE=MyISAM",
        f"CREATE TABLE {quote_ident(db1)}.nopk (a INT, b INT) ENGINE=InnoDB",
    )
    yield [db0, db1]
    s0.execute(f"DROP DATABASE IF EXISTS {quote_ident(db0)}")
    s1.execute(f"DROP DATABASE IF EXISTS {quote_ident(db1)}")


def test_discover_json_lists_tables_and_preflight_findings(
    tmp_path, mariadb_servers, shard_databases, unique_name
):
    servers = mariadb_servers[:2]
    name = f"d{unique_name}"
    _import(tmp_path, topology_yaml(servers, cluster=name, databases=shard_databases))
    servers[1].execute("SET GLOBAL binlog_format = 'STATEMENT'")
    try:
        report, code = _discover_json(name)
    finally:
        servers[1].execute("SET GLOBAL binlog_format = 'ROW'")

    assert set(report) >= {"cluster", "shards", "findings"}
    assert report["cluster"] == name
    shards = {s["name"]: s for s in report["shards"]}
    assert set(shards["s00"]) >= {"name", "instance", "database", "tables"}
    assert shards["s00"]["instance"] == "m0" and shards["s00"]["database"] == shard_databases[0]
    tables0 = {t["name"]: t for t in shards["s00"]["tables"]}
    assert set(tables0) == {"t_order_0", WEIRD}
    assert set(tables0["t_order_0"]) >= {"name", "engine", "rows", "has_primary_key"}
    assert tables0["t_order_0"]["engine"] == "InnoDB" and tables0["t_order_0"]["rows"] == 100
    tables1 = {t["name"]: t for t in shards["s01"]["tables"]}
    assert tables1["legacy"]["engine"] == "MyISAM"
    assert tables1["nopk"]["has_primary_key"] is False

    findings = report["findings"]
    assert all(set(f) >= {"severity", "instance", "shard", "table", "message"} for f in findings)

    def find(**match):
        return [f for f in findings if all(f[k] == v for k, v in match.items())]

    assert find(severity="error", table="legacy") and "MyISAM" in find(table="legacy")[0]["message"]
    assert "no primary key" in find(table="nopk")[0]["message"]
    statement = find(severity="error", instance="m1")
    assert statement and "binlog_format is STATEMENT" in statement[0]["message"]
    assert "ROW" in statement[0]["message"]
    assert not find(severity="error", instance="m0")
    assert find(severity="ok", instance="m0")
    assert code == 1  # an error finding makes discover exit 1

    # The results are stored for the pages.
    cluster = Cluster.objects.get(name=name)
    assert PhysicalTable.objects.filter(shard__cluster=cluster, name=WEIRD).exists()
    m0 = Instance.objects.get(cluster=cluster, name="m0")
    assert m0.flavour == "mariadb" and m0.server_id == servers[0].server_id


def test_discover_exits_zero_when_nothing_is_wrong(
    tmp_path, mariadb_servers, shard_databases, unique_name
):
    name = f"ok{unique_name}"
    _import(
        tmp_path, topology_yaml(mariadb_servers[:1], cluster=name, databases=shard_databases[:1])
    )
    report, code = _discover_json(name)
    assert code == 0
    assert {f["severity"] for f in report["findings"]} == {"ok"}


def test_unreachable_host_is_an_error_finding_within_seconds(tmp_path, unique_name):
    port = free_port()  # nothing listens there
    name = f"u{unique_name}"
    _import(
        tmp_path,
        f"clusters:\n  - name: {name}\n    instances:\n      - {{name: gone, host: 127.0.0.1, port: {port}, user: root}}\n"
        f"    shards:\n      - {{name: s0, instance: gone, database: x}}\n",
    )
    started = time.monotonic()
    report, code = _discover_json(name)
    assert time.monotonic() - started < 10
    assert code == 1
    messages = [f["message"] for f in report["findings"] if f["severity"] == "error"]
    assert any(f"cannot reach gone (127.0.0.1:{port})" in m for m in messages)
    assert any("shard s0 was not checked" in m for m in messages)


def test_wrong_password_unknown_database_and_missing_privileges(
    tmp_path, mariadb_servers, unique_name, monkeypatch
):
    server = mariadb_servers[0]
    user = f"bk{unique_name}"
    server.execute(
        f"CREATE USER '{user}'@'%' IDENTIFIED BY 'right-pw'",
        f"CREATE USER '{user}'@'localhost' IDENTIFIED BY 'right-pw'",
        f"GRANT SELECT, RELOAD ON *.* TO '{user}'@'%'",
        f"GRANT SELECT, RELOAD ON *.* TO '{user}'@'localhost'",
    )
    try:
        name = f"p{unique_name}"
        monkeypatch.setenv("GOOD_PW", "right-pw")
        monkeypatch.setenv("BAD_PW", "wrong-pw")
        _import(
            tmp_path,
            f"clusters:\n  - name: {name}\n    instances:\n"
            f"      - {{name: good, host: 127.0.0.1, port: {server.port}, user: {user}, password_env: GOOD_PW}}\n"
            f"      - {{name: bad, host: 127.0.0.1, port: {server.port}, user: {user}, password_env: BAD_PW}}\n"
            f"    shards:\n      - {{name: s0, instance: good, database: nosuchdb_{unique_name}}}\n",
        )
        report, code = _discover_json(name)
    finally:
        server.execute(
            f"DROP USER IF EXISTS '{user}'@'%'", f"DROP USER IF EXISTS '{user}'@'localhost'"
        )
    assert code == 1
    by_code = {}
    for finding in Finding.objects.filter(cluster__name=name):
        by_code.setdefault(finding.code, []).append(finding.message)
    assert any(f"access denied for user '{user}'" in m for m in by_code["instance.unreachable"])
    assert f"database 'nosuchdb_{unique_name}' does not exist" in by_code["shard.database"][0]
    missing = by_code["privileges.missing"][0]
    assert (
        "REPLICATION CLIENT" in missing and "REPLICATION SLAVE" in missing and "PROCESS" in missing
    )
    assert "RELOAD" not in missing.split("lacks")[1].split(":")[0]


def test_two_instances_on_one_server_share_a_server_id(tmp_path, mariadb_servers, unique_name):
    server = mariadb_servers[2]
    name = f"sid{unique_name}"
    _import(
        tmp_path,
        f"clusters:\n  - name: {name}\n    instances:\n"
        f"      - {{name: x, host: 127.0.0.1, port: {server.port}, user: root}}\n"
        f"      - {{name: y, host: localhost, port: {server.port}, user: root}}\n",
    )
    report, code = _discover_json(name)
    duplicates = [
        f for f in report["findings"] if "server_id" in f["message"] and f["severity"] == "error"
    ]
    assert {f["instance"] for f in duplicates} == {"x", "y"}
    assert code == 1


def test_discovery_replaces_old_results(tmp_path, mariadb_servers, shard_databases, unique_name):
    name = f"r{unique_name}"
    _import(
        tmp_path, topology_yaml(mariadb_servers[:1], cluster=name, databases=shard_databases[:1])
    )
    cluster = Cluster.objects.get(name=name)
    discovery_run(cluster=cluster, actor="test")
    mariadb_servers[0].execute(f"DROP TABLE {quote_ident(shard_databases[0])}.{quote_ident(WEIRD)}")
    discovery_run(cluster=cluster, actor="test")
    assert list(
        PhysicalTable.objects.filter(shard__cluster=cluster).values_list("name", flat=True)
    ) == ["t_order_0"]


def test_grant_parsing_accepts_new_privilege_names_and_database_patterns():
    grants = parse_grants(
        [
            "GRANT RELOAD, PROCESS, BINLOG MONITOR, REPLICATION SLAVE ON *.* TO `b`@`%`",
            "GRANT SELECT, LOCK TABLES, SHOW VIEW, TRIGGER, EVENT ON `orders\\_%`.* TO `b`@`%`",
            "GRANT SELECT (a, b) ON `other`.`t` TO `b`@`%`",
        ]
    )
    assert grants.allows("REPLICATION CLIENT")
    assert grants.allows("SELECT", "orders_07")
    assert not grants.allows("SELECT", "ordersX07")
    assert not grants.allows("SELECT", "other")
    assert parse_grants(["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost`"]).allows("EVENT", "x")
