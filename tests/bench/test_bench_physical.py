"""Physical vs logical benchmark: backup time per instance, and the rebuild of one instance
against a logical restore of the same data.

`make bench` (or `pytest tests/bench/test_bench_physical.py -s -q -p no:xdist`). Three
dedicated MariaDB instances with the full-backup benchmark's dataset
(`SHARDVAULT_BENCH_PHYSICAL_ROWS`, default 600_000 rows), all in one run:

* per instance: ShardVault's logical full backup of that instance's shards (`locked`,
  zstd 1, 4 connections) and its physical backup (`mariabackup --stream=mbstream` piped
  through zstd 1 into the same kind of storage), one instance at a time;
* one instance: the rebuild (stream down, `mbstream -x`, `mariabackup --prepare`, move
  into an empty datadir) against a logical restore of its shards (schema + `LOAD DATA` of
  every chunk + checksum) into fresh databases on the same instance.

Prints a table with the ratios (physical / logical) and writes it as JSON to
`var/bench/physical-*.json`. Never asserts a time: only that both backups succeeded, the
logical restore matched every checksum, and the rebuilt instance, started by the
benchmark, holds every table with the source's checksum.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backups.engine.checksum import table_checksum
from backups.engine.dump import dump_cluster
from backups.engine.load import create_database_objects, load_table
from backups.engine.manifest import manifest_read
from backups.engine.physical import (
    PhysicalPart,
    datadir_install,
    physical_backup,
    physical_extract,
    physical_key,
    physical_prepare,
)
from backups.engine.types import BackupSpec, ShardSpec, TableLoadJob
from backups.storage.local import LocalStorage
from tests.bench.dataset import dataset_build
from tests.servers import MariaDBServer, start_servers, stop_servers

ROOT = Path(__file__).resolve().parents[2]
HMAC_KEY = secrets.token_bytes(32)
MB = 1_000_000


def _rows() -> int:
    value = os.environ.get("SHARDVAULT_BENCH_PHYSICAL_ROWS", "").replace("_", "").strip()
    return int(value) if value else 600_000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    servers = start_servers(3, root=tmp_path_factory.mktemp("physical-bench"), prefix="ph")
    try:
        yield dataset_build(servers, _rows())
    finally:
        stop_servers(servers)


def _checksums(endpoint, databases: list[str], rename=lambda db: db) -> dict:
    from backups.engine.mysql import connect

    conn = connect(endpoint)
    try:
        with conn.cursor() as cur:
            result = {}
            for database in databases:
                cur.execute(
                    "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
                    (rename(database),),
                )
                for (table,) in cur.fetchall():
                    result[(database, table)] = table_checksum(conn, rename(database), table)
            return result
    finally:
        conn.close()


def test_physical_against_logical(dataset, tmp_path):
    storage = LocalStorage(tmp_path / "store", fsync=False)
    quiet = lambda event: None  # noqa: E731
    never = lambda: False  # noqa: E731
    rows = []
    per_instance = {}
    for index, server in enumerate(dataset.servers):
        shards = [s for s in dataset.shards if s.server is server]
        spec = BackupSpec(
            cluster="bench",
            set_id=index + 1,
            set_prefix=f"bench/{index + 1}",
            shards=[
                ShardSpec(
                    name=s.name, instance=server.name, database=s.database, endpoint=server.endpoint
                )
                for s in shards
            ],
            manifest_hmac_key=HMAC_KEY,
            connections_per_instance=4,
        )
        started = time.monotonic()
        logical = dump_cluster(spec, storage, progress=quiet, should_cancel=never)
        logical_s = time.monotonic() - started
        assert logical.ok, logical.error
        started = time.monotonic()
        physical = physical_backup(
            PhysicalPart(
                instance=server.name,
                endpoint=server.endpoint,
                datadir=str(server.datadir),
                key=physical_key(f"bench/p{index + 1}", server.name, False),
            ),
            storage,
            progress=quiet,
            should_cancel=never,
        )
        physical_s = time.monotonic() - started
        per_instance[server.name] = (spec, logical, physical)
        rows.append(
            {
                "instance": server.name,
                "rows": logical.rows,
                "logical_backup_s": round(logical_s, 3),
                "logical_stored_mb": round(logical.stored_bytes / MB, 2),
                "physical_backup_s": round(physical_s, 3),
                "physical_raw_mb": round(physical.raw_bytes / MB, 2),
                "physical_stored_mb": round(physical.stored_bytes / MB, 2),
                "physical_over_logical": round(physical_s / logical_s, 3),
            }
        )

    # One instance lost: rebuild it from the physical copy, or reload it logically.
    server = dataset.servers[0]
    spec, logical, physical = per_instance[server.name]
    databases = [s.database for s in spec.shards]
    expected = _checksums(server.endpoint, databases)
    rebuilt = tmp_path / "rebuilt"
    started = time.monotonic()
    physical_extract(
        storage,
        {"key": physical.key, "sha256": physical.sha256, "stored_bytes": physical.stored_bytes},
        data_key=None,
        target_dir=tmp_path / "scratch",
        should_cancel=never,
    )
    physical_prepare(tmp_path / "scratch")
    datadir_install(tmp_path / "scratch", str(rebuilt / "data"), owner=None)
    rebuild_s = time.monotonic() - started

    doc = manifest_read(storage, spec.set_prefix, HMAC_KEY)
    started = time.monotonic()
    for shard in doc["shards"]:
        target_db = shard["database"] + "_lr"
        create_database_objects(server.endpoint, target_db, shard, tables=None)
        for table in shard["tables"]:
            result = load_table(
                TableLoadJob(
                    manifest_table=table,
                    target=server.endpoint,
                    target_database=target_db,
                    target_table=table["name"],
                ),
                storage,
                progress=quiet,
                should_cancel=never,
                parallel=4,
            )
            assert result.checksum_ok, result.error
    logical_restore_s = time.monotonic() - started

    started = time.monotonic()
    rebuilt_server = MariaDBServer(name="rebuilt", server_id=990, base_dir=rebuilt)
    rebuilt_server.start()
    start_s = time.monotonic() - started
    try:
        assert _checksums(rebuilt_server.endpoint, databases) == expected
    finally:
        rebuilt_server.stop()
        shutil.rmtree(rebuilt, ignore_errors=True)

    report = {
        "generated_at": datetime.now(UTC).isoformat(),
        "cpus": os.cpu_count(),
        "dataset_rows": dataset.rows,
        "dataset_mb": round(dataset.data_bytes / MB, 1),
        "backup_per_instance": rows,
        "rebuild": {
            "instance": server.name,
            "rows": logical.rows,
            "rebuild_s": round(rebuild_s, 3),
            "rebuilt_server_start_s": round(start_s, 3),
            "logical_restore_s": round(logical_restore_s, 3),
            "rebuild_over_logical_restore": round(rebuild_s / logical_restore_s, 3),
        },
    }
    lines = [
        "",
        "=" * 20 + " physical vs logical (ratios below 1.0: physical is faster) " + "=" * 20,
        f"dataset: {dataset.rows:,} rows, {dataset.data_bytes / MB:,.1f} MB on "
        f"{len(dataset.servers)} instances; {os.cpu_count()} CPUs",
        f"{'instance':<10} {'rows':>10} {'logical s':>10} {'physical s':>11} {'phys/log':>9} "
        f"{'log MB':>8} {'phys MB':>8}",
    ]
    for row in rows:
        lines.append(
            f"{row['instance']:<10} {row['rows']:>10,} {row['logical_backup_s']:>10.2f} "
            f"{row['physical_backup_s']:>11.2f} {row['physical_over_logical']:>9.2f} "
            f"{row['logical_stored_mb']:>8.1f} {row['physical_stored_mb']:>8.1f}"
        )
    rb = report["rebuild"]
    lines.append(
        f"rebuild of {rb['instance']} ({rb['rows']:,} rows): {rb['rebuild_s']:.2f} s "
        f"(+ {rb['rebuilt_server_start_s']:.2f} s to start mariadbd on it) against a logical "
        f"restore in {rb['logical_restore_s']:.2f} s: ratio {rb['rebuild_over_logical_restore']:.2f}"
    )
    print("\n".join(lines))
    out = ROOT / "var" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"physical-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written to {path}")
