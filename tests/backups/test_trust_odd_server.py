"""Issue 12, item 12 on the backup paths: a server that answers with empty results or rows of
the wrong shape fails its shard with one sentence naming the instance (and the table), never
a Python exception text such as "cannot unpack non-iterable NoneType object", and the backup
leaves no objects behind. The odd server is tests/fake_mysql.py; the other shard is real."""

from __future__ import annotations

from dataclasses import replace

import pytest

from backups.engine.binlog import binary_logs, master_status_at
from backups.engine.dump import dump_cluster
from backups.engine.errors import EngineError
from backups.engine.mysql import Endpoint, quote_ident
from backups.engine.types import ShardSpec
from backups.models import BackupSet
from backups.services.full_backups import backup_start
from backups.services.sets import set_prefix, set_storage
from shards.models import Shard
from shards.services.topology import instance_create
from tests.backups.conftest import drop_database, make_spec
from tests.factories import make_cluster, make_user

PYTHON_TEXT = ("NoneType", "unpack", "subscriptable", "index out of range", "invalid literal")
ODD = "instance odd gave an answer ShardVault cannot use while "

# Enough answers for the odd server to pass the preflight of a one-table database `db`.
DESCRIBED = {
    "schemata": [("1",)],
    "information_schema.tables": [("t", "InnoDB", "5")],
    "version": [("10.11.6-MariaDB",)],
    "information_schema.columns": [("id", "int", "int(11)", "NEVER", "")],
    "statistics": [("id",)],
    "show create table": [
        ("t", "CREATE TABLE `t` (`id` int NOT NULL, PRIMARY KEY (`id`)) ENGINE=InnoDB")
    ],
}


def _assert_one_clear_sentence(message: str, *expected: str) -> None:
    assert message.startswith(ODD), message
    for part in expected:
        assert part in message, (part, message)
    assert not any(text in message for text in PYTHON_TEXT), message
    assert "\n" not in message


@pytest.fixture
def real_database(mariadb_servers, unique_name):
    server = mariadb_servers[0]
    database = f"odd_{unique_name}"
    drop_database(server, database)
    server.execute(f"CREATE DATABASE {quote_ident(database)}")
    server.execute("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB", database=database)
    server.execute("INSERT INTO t SELECT seq FROM seq_1_to_500", database=database)
    yield server, database
    drop_database(server, database)


@pytest.mark.parametrize(
    "case, options, consistency, expected",
    [
        (
            "no tables listed",  # SCHEMATA says yes, every other query answers no rows
            dict(queries="empty", answers={"schemata": [("1",)]}),
            "locked",
            ("describing database ",),
        ),
        (
            "short rows",  # TABLES answered with two columns instead of three
            dict(queries="ok", answers={"schemata": [("1",)], "tables": [("t", "InnoDB")]}),
            "locked",
            ("describing database ",),
        ),
        (
            "no column answer",  # COLUMNS answers a row of one column
            dict(
                queries="empty",
                answers={**DESCRIBED, "information_schema.columns": [("id",)]},
            ),
            "locked",
            ("reading a table's definition (table ", ".t)"),
        ),
        (
            "odd snapshot status",  # SHOW STATUS LIKE 'binlog_snapshot_%' with one column
            dict(queries="empty", answers={"binlog_snapshot": [("x",)], **DESCRIBED}),
            "lockfree",
            ("taking its snapshot",),
        ),
        (
            "no key range",  # SELECT MIN(id), MAX(id) answers no row
            dict(queries="empty", answers=DESCRIBED),
            "locked",
            ("dumping rows (table ", ".t)"),
        ),
    ],
)
def test_an_oddly_answering_instance_fails_its_shard_in_one_sentence_and_leaves_nothing(
    storage, real_database, fake_mysql, case, options, consistency, expected
):
    server, database = real_database
    fake = fake_mysql(**options)
    spec = make_spec([("s0", server, database)], consistency=consistency)
    odd = ShardSpec(
        name="s_odd",
        instance="odd",
        database=database,
        endpoint=Endpoint(name="odd", host=fake.host, port=fake.port, user="u", password="p"),
    )
    spec = replace(spec, shards=[*spec.shards, odd])
    result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
    assert not result.ok, case
    errors = {s.name: s.error for s in result.shards}
    _assert_one_clear_sentence(errors["s_odd"], *expected)
    assert errors["s0"] == "", case
    assert result.error == f"shard s_odd: {errors['s_odd']}"
    assert list(storage.list(spec.set_prefix + "/")) == [], case


def test_binlog_position_and_listing_from_an_odd_server_name_the_instance(fake_mysql):
    fake = fake_mysql(queries="empty")  # every query: a result with no rows
    endpoint = Endpoint(name="odd", host=fake.host, port=fake.port, user="u", password="p")
    with pytest.raises(EngineError) as refused:
        master_status_at(endpoint)
    _assert_one_clear_sentence(str(refused.value), "reading its binlog position")
    short = fake_mysql(queries="empty", answers={"binary logs": [("binlog.000001",)]})
    endpoint = replace(endpoint, port=short.port)
    with pytest.raises(EngineError) as refused:
        binary_logs(endpoint)
    _assert_one_clear_sentence(str(refused.value), "listing its binlogs")


@pytest.mark.django_db(transaction=True)
def test_a_backup_of_a_cluster_with_an_oddly_answering_instance_fails_that_shard_clearly(
    mariadb_servers, unique_name, run_jobs, fake_mysql
):
    cluster = make_cluster(mariadb_servers[:1], name=f"od{unique_name}", tables={"t": 50})
    fake = fake_mysql(queries="empty", answers={"schemata": [("1",)]})
    odd = instance_create(
        actor="test", cluster=cluster, name="odd", host=fake.host, port=fake.port,
        user="backup", password="Odd-pw-1",
    )  # fmt: skip
    Shard.objects.create(cluster=cluster, name="s99", instance=odd, database="shop")

    backup_set = backup_start(cluster=cluster, actor=make_user("operator"))
    run_jobs("backups")
    backup_set = BackupSet.objects.get(pk=backup_set.pk)
    assert backup_set.status == "failed"
    _assert_one_clear_sentence(backup_set.error.removeprefix("shard s99: "), "database shop")
    parts = {p.shard_name: p for p in backup_set.shard_backups.all()}
    _assert_one_clear_sentence(parts["s99"].error, "describing database shop")
    assert parts["s00"].error == ""
    prefix = set_prefix(backup_set)
    assert list(set_storage(backup_set).list(prefix + "/")) == []
