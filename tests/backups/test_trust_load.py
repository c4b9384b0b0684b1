"""Trust boundary of the loader (issue 12, item 2): a restore or drill target that asks for a
local file gets nothing but the chunk stream the loader opened, and the load says why it failed."""

from __future__ import annotations

import pytest

from backups.engine.dump import dump_cluster
from backups.engine.errors import EngineError
from backups.engine.load import load_table
from backups.engine.mysql import Endpoint, quote_ident
from backups.engine.types import TableLoadJob
from tests.backups.conftest import drop_database, make_spec, read_manifest

MARKER = b"WORKER-SECRET-7f3a"


@pytest.fixture
def small_backup(storage, mariadb_servers, unique_name):
    """A real backup of one small table: the manifest entry a restore would load."""
    server = mariadb_servers[0]
    database = f"trl_{unique_name}"
    server.execute(
        f"CREATE DATABASE {quote_ident(database)}",
        f"CREATE TABLE {quote_ident(database)}.t (id INT PRIMARY KEY, v VARCHAR(20))",
        f"INSERT INTO {quote_ident(database)}.t SELECT seq, 'row' FROM mysql.seq_1_to_50",
    )
    try:
        spec = make_spec([("s1", server, database)])
        result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
        assert result.ok, result.error
        yield read_manifest(storage, spec)["shards"][0]["tables"][0]
    finally:
        drop_database(server, database)


@pytest.fixture
def worker_file(tmp_path):
    path = tmp_path / "worker-secret.txt"
    path.write_bytes(MARKER + b"\n")
    return str(path)


def _load(storage, table, fake) -> None:
    job = TableLoadJob(
        manifest_table=table,
        target=Endpoint(name="drill", host=fake.host, port=fake.port, user="u", password="p"),
        target_database="db",
        target_table="t",
    )
    load_table(job, storage, progress=lambda e: None, should_cancel=lambda: False)


def test_a_target_asking_for_a_worker_file_during_session_setup_gets_nothing(
    storage, small_backup, fake_mysql, worker_file
):
    fake = fake_mysql(infile_on="sql_mode", infile_name=worker_file)
    with pytest.raises(EngineError) as refused:
        _load(storage, small_backup, fake)
    assert fake.received_infile, "the fake server never got to ask"
    assert all(MARKER not in received for received in fake.received_infile)
    assert all(received == b"" for received in fake.received_infile)
    message = str(refused.value)
    assert "drill (127.0.0.1:" in message and "was refused" in message and "\n" not in message


def test_a_target_naming_another_file_for_the_load_gets_neither_the_file_nor_the_chunks(
    storage, small_backup, fake_mysql, worker_file
):
    fake = fake_mysql(infile_on="LOAD DATA", infile_name=worker_file)
    with pytest.raises(EngineError) as refused:
        _load(storage, small_backup, fake)
    assert fake.received_infile, "the fake server never got to ask"
    assert all(received == b"" for received in fake.received_infile)
    assert "worker-secret.txt" in str(refused.value) and "was refused" in str(refused.value)
