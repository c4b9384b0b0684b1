"""The dump's own row reader (engine/wire.py) against PyMySQL's, on a real MariaDB.

Chunk lines reach storage through `stream_lines`, which reads the row packets itself;
every length-prefix form and packet boundary must give back exactly the bytes PyMySQL
reads, and leave the connection usable.
"""

from __future__ import annotations

import random
import zlib

import pytest

from backups.engine import checksum
from backups.engine.errors import EngineError
from backups.engine.mysql import connect
from backups.engine.wire import stream_lines

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
