"""The dump's own row reader (engine/wire.py) against PyMySQL's, on a real MariaDB.

Chunk lines reach storage through `stream_lines`, which reads the row packets itself;
every length-prefix form and packet boundary must give back exactly the bytes PyMySQL
reads, and leave the connection usable.
"""

from __future__ import annotations

import functools
import operator
import os
import random
import subprocess
import sys
import zlib

import pytest

from backups.engine import checksum, wire
from backups.engine.errors import EngineError
from backups.engine.mysql import connect
from backups.engine.schema import Column
from backups.engine.wire import stream_line_blocks, stream_lines

# Value lengths around every length-prefix form (1 byte < 251, 0xFC + 2, 0xFD + 3) and
# around the 16 MB packet limit (0xFD + 3 + 16777212 bytes fills one packet exactly, so
# an empty packet follows; longer values continue in a second packet).
LENGTHS = [0, 1, 250, 251, 252, 65535, 65536, 70_000, 1 << 20, 16_777_211, 16_777_212, 20_000_000]


def _pymysql_rows(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return [row[0] for row in cur.fetchall()]


@pytest.fixture
def conn(mariadb_servers):
    server = mariadb_servers[0]
    with server.connect() as admin, admin.cursor() as cur:
        cur.execute("SET GLOBAL max_allowed_packet = 64 * 1024 * 1024")
    conn = connect(server.endpoint)
    yield conn
    conn.close()


def test_every_length_prefix_and_packet_boundary_reads_back_exactly(conn):
    # Bytes 0xFB..0xFF first in a value, and every byte value, must not look like markers.
    sql = " UNION ALL ".join(
        f"SELECT {n} AS n, CONCAT(UNHEX('FEFF00FB'), REPEAT(_binary'\\t\\n\\\\x', {n})) AS v"
        for n in range(4)
    )
    values = [
        f"SELECT {i} AS n, LEFT(REPEAT(CONCAT(UNHEX('FE'), _binary'ab\\0'), {n // 4 + 1}), {n}) AS v"
        for i, n in enumerate(LENGTHS, start=10)
    ]
    sql = f"SELECT v FROM ({sql} UNION ALL {' UNION ALL '.join(values)}) AS t ORDER BY n"
    got = [line for lines in stream_lines(conn, sql) for line in lines]
    assert [len(v) for v in got[4:]] == LENGTHS
    assert got == _pymysql_rows(conn, sql)
    assert _pymysql_rows(conn, "SELECT 42") == [42]  # the connection is still in step


def test_many_rows_across_socket_reads_arrive_in_order_and_in_batches(conn):
    sql = (
        "SELECT CONCAT(seq, _binary'\\t', REPEAT(CHAR(65 + seq % 26), seq % 300))"
        " FROM mysql.seq_1_to_60000"
    )
    batches = list(stream_lines(conn, sql))
    got = [line for lines in batches for line in lines]
    assert got == _pymysql_rows(conn, sql)
    assert len(got) == 60000 and 1 < len(batches) < 60000
    assert list(stream_lines(conn, "SELECT 'x' FROM mysql.seq_1_to_3 WHERE seq > 5")) == []


def test_a_null_line_is_refused_and_an_abandoned_stream_closes_the_connection(mariadb_servers):
    server = mariadb_servers[0]
    conn = connect(server.endpoint)
    with pytest.raises(EngineError, match="NULL"):
        for _ in stream_lines(conn, "SELECT IF(seq = 3, NULL, 'a') FROM mysql.seq_1_to_5"):
            pass
    assert not conn.open  # rows left unread: never reused out of step
    conn = connect(server.endpoint)
    lines = stream_lines(conn, "SELECT REPEAT('a', 300) FROM mysql.seq_1_to_100000")
    next(lines)
    lines.close()
    assert not conn.open


def test_connections_share_one_tls_context_per_process(mariadb_servers):
    first, second = connect(mariadb_servers[0].endpoint), connect(mariadb_servers[1].endpoint)
    try:
        assert first.ctx is second.ctx
    finally:
        first.close()
        second.close()


def test_the_line_crc_is_zlibs_crc32():
    """The table checksum's per-line CRC (ISA-L's when installed) is zlib's CRC-32 exactly."""
    rng = random.Random(14)
    lines = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (0, 1, 7, 64, 275, 5000)]
    lines += [bytes(range(256)) * 3, b"\\N\t\\\n\\0"]
    assert checksum.line_crc32 is not zlib.crc32  # the fast one is what the dump uses
    assert [checksum.line_crc32(line) for line in lines] == [zlib.crc32(line) for line in lines]


def _escaped_line(row) -> bytes:
    """A chunk line written out in Python, independently of the SQL and the C helper."""
    fields = []
    for value in row:
        if value is None:
            fields.append(b"\\N")
            continue
        value = value.replace(b"\\", b"\\\\").replace(b"\t", b"\\\t")
        fields.append(value.replace(b"\n", b"\\\n").replace(b"\0", b"\\0"))
    return b"\t".join(fields)


def _blocks(conn, sql, columns):
    data, rows, crc_sum, crc_xor = b"", 0, 0, 0
    for block, count, block_sum, block_xor in stream_line_blocks(conn, sql, columns):
        data += block
        rows += count
        crc_sum += block_sum
        crc_xor ^= block_xor
    return data, rows, crc_sum, crc_xor


def test_client_built_lines_match_the_format_for_every_length_prefix_and_null(conn):
    """The C helper's lines (several columns per packet, NULLs, every length-prefix form,
    rows split over 16 MB packets) are the chunk format's bytes, with their CRC-32s, and
    the server-built path yields the same block for the same values."""
    assert wire.line_builder() == "client"  # `make test` builds the helper
    hostile = "CONCAT(UNHEX('FEFF00FB095C0A'), REPEAT(_binary'\\t\\n\\\\\\0x', 3))"
    values = [
        f"SELECT {i} AS n, LEFT(REPEAT(CONCAT(UNHEX('FE5C'), _binary'a\\tb\\0\\n'), {n // 6 + 1}), {n}) AS v"
        for i, n in enumerate(LENGTHS, start=10)
    ]
    values += [
        f"SELECT 1 AS n, {hostile} AS v",
        "SELECT 2 AS n, NULL AS v",
        "SELECT 3 AS n, '' AS v",
    ]
    source = f"({' UNION ALL '.join(values)}) AS t"
    raw = (
        "SELECT CAST(n AS BINARY), v, IF(n % 2, NULL, CAST(n * 7 AS BINARY))"
        f" FROM {source} ORDER BY n"
    )
    expected = [_escaped_line(row) for row in _pymysql_rows_all(conn, raw)]
    data, rows, crc_sum, crc_xor = _blocks(conn, raw, 3)
    assert data == b"".join(line + b"\n" for line in expected)
    assert rows == len(expected) == len(LENGTHS) + 3
    assert crc_sum == sum(zlib.crc32(line) for line in expected)
    assert crc_xor == functools.reduce(operator.xor, (zlib.crc32(line) for line in expected))
    column = Column(name="v", data_type="longblob", column_type="longblob")
    one = f"SELECT {checksum.line_expression([column])} FROM {source} ORDER BY n"
    single = [_escaped_line([row[1]]) for row in _pymysql_rows_all(conn, raw)]
    assert _blocks(conn, one, 0)[0] == b"".join(line + b"\n" for line in single)
    assert _pymysql_rows(conn, "SELECT 42") == [42]  # the connection is still in step


def test_client_lines_over_many_socket_reads_and_a_wrong_column_count(conn):
    sql = (
        "SELECT CAST(seq AS BINARY), REPEAT(CHAR(65 + seq % 26, 9), seq % 300)"
        " FROM mysql.seq_1_to_60000"
    )
    blocks = list(stream_line_blocks(conn, sql, 2))
    expected = [_escaped_line(row) for row in _pymysql_rows_all(conn, sql)]
    assert b"".join(block[0] for block in blocks) == b"".join(x + b"\n" for x in expected)
    assert sum(block[1] for block in blocks) == 60000 and 1 < len(blocks) < 60000
    with pytest.raises(EngineError, match="returned 2 columns, not 3"):
        list(stream_line_blocks(conn, sql, 3))


def _pymysql_rows_all(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return [
            tuple(v if v is None or isinstance(v, bytes) else str(v).encode() for v in row)
            for row in cur.fetchall()
        ]


def test_without_the_c_helper_lines_are_built_by_the_server_and_asking_for_it_fails_clearly():
    """A machine that could not build the helper (no gcc): dumps keep the server-built path;
    SHARDVAULT_LINE_BUILDER=client there, or a value that is not a builder, is one clear error."""
    script = (
        "import os, sys\n"
        "sys.modules['backups.engine._rowlines'] = None  # as if it was never built\n"
        "from backups.engine import wire\n"
        "print(wire.line_builder())\n"
        "os.environ['SHARDVAULT_LINE_BUILDER'] = 'client'\n"
        "try:\n"
        "    wire.line_builder()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SHARDVAULT_LINE_BUILDER"}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "server",
        "EngineError SHARDVAULT_LINE_BUILDER=client, but the C helper is not built"
        " (run .ci/build-ext; it needs gcc, Python's headers and zlib1g-dev)",
    ]


def test_an_unknown_line_builder_is_refused(monkeypatch):
    monkeypatch.setenv("SHARDVAULT_LINE_BUILDER", "gpu")
    with pytest.raises(EngineError, match="must be 'client' or 'server', not 'gpu'"):
        wire.line_builder()


@pytest.mark.parametrize("fold", [True, False], ids=["pclmul", "zlib"])
def test_the_helpers_line_crc_is_zlibs_for_every_length(fold):
    """The C helper's per-line CRC-32 (folded with PCLMULQDQ where the CPU has it, zlib's
    otherwise) equals zlib's for lines from empty to past 64 KiB, at every fold boundary."""
    script = (
        "import random, zlib\n"
        "from backups.engine import _rowlines\n"
        "rng = random.Random(7)\n"
        "lengths = list(range(0, 400)) + [rng.randrange(400, 70_000) for _ in range(200)]\n"
        "bad = []\n"
        "for n in lengths:\n"
        "    value = bytes(rng.choice(b'abcdefghij0123456789 .:-') for _ in range(n))\n"
        "    if n < 251: head = bytes([n])\n"
        "    elif n < 65536: head = b'\\xfc' + n.to_bytes(2, 'little')\n"
        "    else: head = b'\\xfd' + n.to_bytes(3, 'little')\n"
        "    line, crc = _rowlines.row(head + value, 1)\n"
        "    if line != value + b'\\n' or crc != zlib.crc32(value): bad.append(n)\n"
        "print(_rowlines.FOLDED_CRC, bad)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SHARDVAULT_CRC_NO_FOLD"}
    if not fold:
        env["SHARDVAULT_CRC_NO_FOLD"] = "1"
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split(" ", 1)[1].strip() == "[]"
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read().split()
    folding = fold and "pclmulqdq" in flags and "sse4_1" in flags
    assert run.stdout.startswith("1 " if folding else "0 ")  # the path meant was the one run
