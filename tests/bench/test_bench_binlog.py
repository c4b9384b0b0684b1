"""Binlog benchmark: capture rate, apply rate vs `mariadb-binlog | mariadb`, keeping up with writers.

`make bench` (or `pytest tests/bench/test_bench_binlog.py -s -q -p no:xdist`). One dedicated
MariaDB instance with a ROW binlog; sizes from the environment:

* `SHARDVAULT_BENCH_BINLOG_ROWS` — rows written for the capture/apply runs (default 300_000)
* `SHARDVAULT_BENCH_WRITER_SECONDS` — how long the 5,000 rows/s writer runs (default 10)

Prints a table and writes it as JSON to `var/bench/binlog-*.json`. Never asserts a time:
only that every apply produced exactly the source's rows (server-side checksums).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backups.engine import codec
from backups.engine.binlog import master_status
from backups.engine.binlog_apply import SegmentSource, apply_segments
from backups.engine.capture import StoredObject, capture_instance
from backups.engine.checksum import table_checksum
from backups.engine.mysql import quote_ident
from backups.storage.local import LocalStorage
from tests.servers import start_servers, stop_servers

ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000
DDL = (
    "CREATE TABLE orders (id BIGINT UNSIGNED PRIMARY KEY, user_id BIGINT NOT NULL,"
    " amount DECIMAL(12,2) NOT NULL, note VARCHAR(200) NULL, created_at DATETIME(6) NOT NULL)"
)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").replace("_", "").strip()
    return int(value) if value else default


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    servers = start_servers(1, root=tmp_path_factory.mktemp("binlog-bench"), prefix="bl")
    yield servers[0]
    stop_servers(servers)


def _store(storage):
    def store(key, chunks):
        raw = [0]

        def counted():
            for chunk in chunks:
                raw[0] += len(chunk)
                yield chunk

        stored = storage.put_stream(key, codec.encode(counted(), level=1, data_key=None))
        return StoredObject(key, raw[0], stored.size, stored.sha256)

    return store


def _checksum(server, database):
    conn = server.connect(database)
    try:
        return table_checksum(conn, database, "orders")
    finally:
        conn.close()


def _fresh(server, database):
    server.execute(
        f"DROP DATABASE IF EXISTS {quote_ident(database)}",
        f"CREATE DATABASE {quote_ident(database)}",
    )
    server.execute(DDL, database=database)


def _print(rows, title):
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    for name, *values in rows:
        print(f"  {name:<{width}}  " + "  ".join(f"{v:>14}" for v in values))


def test_bench_binlog_capture_and_apply(server, tmp_path):
    rows = _env_int("SHARDVAULT_BENCH_BINLOG_ROWS", 300_000)
    _fresh(server, "bsrc")
    start_file, start_pos, _ = master_status(server.endpoint)
    batch = 1000
    conn = server.connect("bsrc")
    with conn.cursor() as cur:
        for first in range(1, rows + 1, batch):
            last = min(rows, first + batch - 1)
            cur.execute(
                "INSERT INTO orders SELECT seq, seq % 977, seq / 3, CONCAT('note ', seq),"
                f" TIMESTAMP'2024-01-01 00:00:00' + INTERVAL seq SECOND FROM seq_{first}_to_{last}"
            )
        cur.execute("UPDATE orders SET amount = amount + 1 WHERE id % 10 = 0")
        cur.execute("DELETE FROM orders WHERE id % 50 = 0")
    conn.close()
    changes = rows + rows // 10 + rows // 50
    end_file, end_pos, _ = master_status(server.endpoint)
    storage = LocalStorage(tmp_path / "store", fsync=False)

    started = time.perf_counter()
    capture = capture_instance(
        endpoint=server.endpoint,
        instance="bl1",
        start_file=start_file,
        start_pos=start_pos,
        end_file=end_file,
        end_pos=end_pos,
        set_prefix="bench/1",
        store=_store(storage),
        server_id=3_999_900_001,
    )
    capture_s = time.perf_counter() - started
    source = _checksum(server, "bsrc")

    def sources():
        return [
            SegmentSource(
                entry=s.manifest_entry(),
                open=lambda s=s: codec.decode(storage.get_stream(s.key), data_key=None),
            )
            for s in capture.segments
        ]

    files = []
    for index, segment in enumerate(capture.segments):
        path = tmp_path / f"segment-{index}.bin"
        with open(path, "wb") as handle:
            for piece in codec.decode(storage.get_stream(segment.key), data_key=None):
                handle.write(piece)
        files.append(str(path))

    def apply_shardvault() -> float:
        _fresh(server, "bsv")
        started = time.perf_counter()
        apply_segments(
            target=server.endpoint,
            source_database="bsrc",
            target_database="bsv",
            stream="bl1",
            segments=sources(),
            start_file=start_file,
            start_pos=start_pos,
            until=None,
        )
        elapsed = time.perf_counter() - started
        assert _checksum(server, "bsv") == source
        return elapsed

    def apply_tools() -> float:
        # The server's own tools on the same segments: mariadb-binlog | mariadb.
        _fresh(server, "btool")
        started = time.perf_counter()
        decoder = subprocess.Popen(
            [
                "mariadb-binlog",
                "--no-defaults",
                "--database=bsrc",
                "--rewrite-db=bsrc->btool",
                *files,
            ],
            stdout=subprocess.PIPE,
        )
        client = subprocess.run(
            [
                "mariadb",
                "--no-defaults",
                "-h127.0.0.1",
                f"-P{server.port}",
                "-uroot",
                "--binary-mode",
            ],
            stdin=decoder.stdout,
            capture_output=True,
        )
        decoder.wait()
        elapsed = time.perf_counter() - started
        assert decoder.returncode == 0 and client.returncode == 0, client.stderr[-500:]
        assert _checksum(server, "btool") == source
        return elapsed

    # Best of two, in alternating order, so neither side gets only the warm run.
    sv_runs, tool_runs = [apply_shardvault()], [apply_tools()]
    tool_runs.append(apply_tools())
    sv_runs.append(apply_shardvault())
    sv_s, tool_s = min(sv_runs), min(tool_runs)

    results = {
        "rows_changed": changes,
        "binlog_bytes": capture.raw_bytes,
        "events": capture.events,
        "capture_s": capture_s,
        "capture_events_per_s": capture.events / capture_s,
        "capture_mb_per_s": capture.raw_bytes / MB / capture_s,
        "apply_shardvault_s": sv_s,
        "apply_shardvault_rows_per_s": changes / sv_s,
        "apply_tools_s": tool_s,
        "apply_tools_rows_per_s": changes / tool_s,
    }
    _print(
        [
            ("", "seconds", "rows/s", "events/s", "MB/s"),
            (
                "capture (replication protocol)",
                f"{capture_s:.2f}",
                f"{changes / capture_s:,.0f}",
                f"{capture.events / capture_s:,.0f}",
                f"{capture.raw_bytes / MB / capture_s:.1f}",
            ),
            ("apply ShardVault", f"{sv_s:.2f}", f"{changes / sv_s:,.0f}", "", ""),
            ("apply mariadb-binlog | mariadb", f"{tool_s:.2f}", f"{changes / tool_s:,.0f}", "", ""),
        ],
        f"binlog: {changes:,} row changes, {capture.raw_bytes / MB:.1f} MB of binlog, "
        f"{capture.events:,} events",
    )
    _write("capture-apply", results)


def test_bench_capture_keeps_up_with_a_5000_rows_per_second_writer(server, tmp_path):
    seconds = _env_int("SHARDVAULT_BENCH_WRITER_SECONDS", 10)
    target_rate = 5000
    rows_per_tx = 50
    _fresh(server, "bkeep")
    storage = LocalStorage(tmp_path / "store", fsync=False)
    stop = threading.Event()
    written = [0]

    def writer():
        conn = server.connect("bkeep")
        next_id = 1
        begin = time.perf_counter()
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute(
                    "INSERT INTO orders SELECT seq, seq % 977, seq / 3, 'w', NOW(6)"
                    f" FROM seq_{next_id}_to_{next_id + rows_per_tx - 1}"
                )
                next_id += rows_per_tx
                written[0] += rows_per_tx
                ahead = written[0] / target_rate - (time.perf_counter() - begin)
                if ahead > 0:
                    time.sleep(ahead)
        conn.close()

    file, pos, _ = master_status(server.endpoint)
    thread = threading.Thread(target=writer)
    thread.start()
    captures = []
    begin = time.perf_counter()
    try:
        while time.perf_counter() - begin < seconds:
            end_file, end_pos, _ = master_status(server.endpoint)
            t0 = time.perf_counter()
            capture = capture_instance(
                endpoint=server.endpoint,
                instance="bl1",
                start_file=file,
                start_pos=pos,
                end_file=end_file,
                end_pos=end_pos,
                set_prefix=f"keep/{len(captures)}",
                store=_store(storage),
                server_id=3_999_900_002,
            )
            captures.append((time.perf_counter() - t0, capture))
            file, pos = end_file, end_pos
            time.sleep(1)
    finally:
        stop.set()
        thread.join()
    wall = time.perf_counter() - begin
    write_rate = written[0] / wall
    busy = sum(t for t, _ in captures)
    events = sum(c.events for _, c in captures)
    raw = sum(c.raw_bytes for _, c in captures)
    # Capture keeps up when copying N seconds of writes takes well under N seconds.
    _print(
        [
            ("", "value"),
            ("writer rows/s achieved", f"{write_rate:,.0f}"),
            ("capture rounds", str(len(captures))),
            ("capture busy seconds", f"{busy:.2f} of {wall:.1f}"),
            ("capture events/s while busy", f"{events / busy:,.0f}" if busy else "-"),
            ("capture MB/s while busy", f"{raw / MB / busy:.1f}" if busy else "-"),
            ("headroom (wall / busy)", f"{wall / busy:.1f}x" if busy else "-"),
        ],
        f"keeping up with a {target_rate:,} rows/s writer for {seconds} s",
    )
    assert captures and events > 0
    _write(
        "keep-up",
        {
            "writer_rows_per_s": write_rate,
            "capture_busy_s": busy,
            "wall_s": wall,
            "events": events,
            "binlog_bytes": raw,
            "rounds": len(captures),
        },
    )


def _write(name: str, results: dict) -> None:
    out = ROOT / "var" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (out / f"binlog-{name}-{stamp}.json").write_text(json.dumps(results, indent=2))
