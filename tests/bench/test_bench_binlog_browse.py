"""Binlog browser benchmark: transactions listed per second, with the table filter off and on.

`pytest tests/bench/test_bench_binlog_browse.py -s -q -p no:xdist` (also part of `make bench`).
One dedicated MariaDB instance writes a busy day in miniature: many small transactions over
three tables, round robin, plus a rare table written in one burst; the binlog is captured into
stored segments (zstd, as incrementals store them) and listed the way `binlog events` lists it
(segments narrowed by their table index, then decoded event by event).

* `SHARDVAULT_BENCH_BROWSE_TRANSACTIONS` — transactions written (default 150_000)

Prints the rates and writes them as JSON to `var/bench/browse-*.json`. Never asserts a time:
only that each listing found exactly the transactions written.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from backups.engine import codec
from backups.engine.binlog import master_status
from backups.engine.binlog_browse import segment_transactions
from backups.engine.capture import capture_instance
from backups.selectors.binlog_browser import segment_wanted
from backups.storage.local import LocalStorage
from tests.bench.test_bench_binlog import _env_int, _store
from tests.servers import start_servers, stop_servers

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("orders", "payments", "events")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    servers = start_servers(1, root=tmp_path_factory.mktemp("browse-bench"), prefix="bb")
    yield servers[0]
    stop_servers(servers)


def test_bench_binlog_browse(server, tmp_path):
    total = _env_int("SHARDVAULT_BENCH_BROWSE_TRANSACTIONS", 150_000)
    per_table = total // len(TABLES)
    rare = max(10, total // 100)
    server.execute(
        "SET GLOBAL max_binlog_size = 16777216",
        "DROP DATABASE IF EXISTS browse",
        "CREATE DATABASE browse",
        *(
            f"CREATE TABLE browse.{t} (id BIGINT PRIMARY KEY, amount DECIMAL(12,2),"
            " note VARCHAR(100), at DATETIME(6))"
            for t in (*TABLES, "rare")
        ),
    )
    start_file, start_pos, _ = master_status(server.endpoint)
    # Every statement in autocommit: one transaction each, written server-side to be quick.
    body = " ".join(
        f"INSERT INTO browse.{t} VALUES (i, i / 7, CONCAT('n', i), NOW(6));" for t in TABLES
    )
    server.execute(
        f"BEGIN NOT ATOMIC FOR i IN 1..{per_table} DO {body} END FOR; END",
        "FLUSH BINARY LOGS",
        f"BEGIN NOT ATOMIC FOR i IN 1..{rare} DO"
        " INSERT INTO browse.rare VALUES (i, i, 'rare', NOW(6)); END FOR; END",
        "FLUSH BINARY LOGS",
        f"BEGIN NOT ATOMIC FOR i IN 1..{per_table // 4} DO"
        " UPDATE browse.orders SET amount = amount + 1 WHERE id = i; END FOR; END",
    )
    end_file, end_pos, _ = master_status(server.endpoint)
    storage = LocalStorage(tmp_path / "store", fsync=False)
    capture = capture_instance(
        endpoint=server.endpoint,
        instance="bb1",
        start_file=start_file,
        start_pos=start_pos,
        end_file=end_file,
        end_pos=end_pos,
        set_prefix="bench/browse",
        store=_store(storage),
        server_id=3_999_900_002,
    )
    segments = capture.segments

    def listing(tables: set[str] | None) -> tuple[int, float, int]:
        def wants(database, table):
            return tables is None or table in tables

        started = time.perf_counter()
        count = read = 0
        for segment in segments:
            index = SimpleNamespace(tables=segment.manifest_entry().get("tables", []))
            if not segment_wanted(index, None if tables is None else wants, {"browse"}):
                continue
            read += 1
            blocks = codec.decode(storage.get_stream(segment.key), data_key=None)
            for summary in segment_transactions(
                blocks, file=segment.first_file, wants=lambda d, t: d == "browse" and wants(d, t)
            ):
                count += bool(summary.tables)
        return count, time.perf_counter() - started, read

    written = per_table * len(TABLES) + rare + per_table // 4
    all_count, all_s, all_read = listing(None)
    orders_count, orders_s, orders_read = listing({"orders"})
    rare_count, rare_s, rare_read = listing({"rare"})
    assert all_count == written
    assert orders_count == per_table + per_table // 4
    assert rare_count == rare

    results = {
        "transactions_in_binlog": written,
        "segments": len(segments),
        "filter_off": {"listed": all_count, "seconds": all_s, "per_second": all_count / all_s,
                       "segments_read": all_read},
        "filter_on_common_table": {"listed": orders_count, "seconds": orders_s,
                                   "scanned_per_second": written / orders_s,
                                   "segments_read": orders_read},
        "filter_on_rare_table": {"listed": rare_count, "seconds": rare_s,
                                 "scanned_per_second": written / rare_s,
                                 "segments_read": rare_read},
    }  # fmt: skip
    print("\nbinlog browser (transactions per second)")
    print(f"  {written} transactions in {len(segments)} segments")
    print(f"  filter off:              {all_count / all_s:>12,.0f} listed/s  ({all_s:.2f} s)")
    print(
        f"  --tables orders (1/3):   {written / orders_s:>12,.0f} scanned/s ({orders_s:.2f} s,"
        f" {orders_count} listed)"
    )
    print(
        f"  --tables rare (1 file):  {written / rare_s:>12,.0f} scanned/s ({rare_s:.2f} s,"
        f" {rare_count} listed, {rare_read} of {len(segments)} segments read)"
    )
    out = ROOT / "var" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"browse-{stamp}.json").write_text(json.dumps(results, indent=2))
