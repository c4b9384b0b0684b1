"""Global consistency of `locked` backups across three servers (DESIGN.md "Consistency").

A writer appends sequence numbers round-robin to shards on three different servers,
each insert committed before the next begins. Every backup, whenever it lands, must
restore to exactly 1..K for some K: no gap, on any shard.
"""

from __future__ import annotations

import random
import threading
import time

from backups.engine.dump import dump_cluster
from backups.engine.load import create_database_objects, load_table
from backups.engine.mysql import quote_ident
from backups.engine.types import TableLoadJob
from tests.backups.conftest import drop_database, make_spec, read_manifest


def test_locked_backups_restore_a_gap_free_sequence(storage, mariadb_servers, unique_name):
    database = f"seq_{unique_name}"
    for server in mariadb_servers:
        drop_database(server, database)
        server.execute(f"CREATE DATABASE {quote_ident(database)}")
        server.execute(
            "CREATE TABLE seq (n BIGINT PRIMARY KEY, pad VARCHAR(20)) ENGINE=InnoDB",
            database=database,
        )
    stop = threading.Event()
    written = [0]
    failures: list[BaseException] = []

    def writer() -> None:
        conns = [server.connect(database) for server in mariadb_servers]
        try:
            n = 0
            while not stop.is_set():
                n += 1
                with conns[n % 3].cursor() as cur:
                    cur.execute(
                        "INSERT INTO seq VALUES (%s, 'x')", (n,)
                    )  # autocommit: committed on return
                written[0] = n
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
        finally:
            for conn in conns:
                conn.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    rng = random.Random()
    manifests = []
    try:
        for set_id in range(1, 5):
            time.sleep(rng.uniform(0.05, 0.4))
            spec = make_spec(
                [(f"s{i}", server, database) for i, server in enumerate(mariadb_servers)],
                set_id=set_id,
                cluster=f"seq{unique_name}",
                chunk_rows=200,
                connections_per_instance=2,
            )
            result = dump_cluster(
                spec, storage, progress=lambda e: None, should_cancel=lambda: False
            )
            assert result.ok, result.error
            assert result.lock_window_ms is not None and 0 < result.lock_window_ms < 5000
            manifests.append(read_manifest(storage, spec))
    finally:
        stop.set()
        thread.join(10)
    assert not failures, failures
    assert written[0] > 100

    target = mariadb_servers[0]
    cuts = []
    for manifest in manifests:
        assert manifest["lock_window_ms"] > 0
        numbers: list[int] = []
        for shard in manifest["shards"]:
            target_database = f"seqr_{unique_name}_{manifest['set_id']}_{shard['name']}"
            try:
                create_database_objects(target.endpoint, target_database, shard, tables=None)
                job = TableLoadJob(
                    manifest_table=shard["tables"][0],
                    target=target.endpoint,
                    target_database=target_database,
                    target_table="seq",
                )
                loaded = load_table(
                    job, storage, progress=lambda e: None, should_cancel=lambda: False
                )
                assert loaded.checksum_ok, loaded.error
                numbers += [
                    row[0] for row in target.execute("SELECT n FROM seq", database=target_database)
                ]
            finally:
                drop_database(target, target_database)
        k = len(numbers)
        assert k > 0
        assert sorted(numbers) == list(range(1, k + 1)), (
            f"set {manifest['set_id']} is not a consistent cut"
        )
        cuts.append(k)
    assert (
        cuts == sorted(cuts) and len(set(cuts)) > 1
    )  # the backups really landed at different moments
    for server in mariadb_servers:
        drop_database(server, database)
