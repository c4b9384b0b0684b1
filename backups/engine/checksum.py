"""The chunk line format and the server-side, order-independent table checksum.

One SQL expression turns a row into its chunk line: the bytes `SELECT ... INTO
OUTFILE ... CHARACTER SET binary` writes with the default FIELDS/LINES options
(tab between fields, `\\N` for NULL, backslash before backslash, tab and
newline, NUL written as `\\0`, BIT as raw bytes, session time zone +00:00).
Two deliberate differences, both because INTO OUTFILE's own output does not
load back correctly: it prints FLOAT with 6 significant digits (losing
precision), so FLOAT columns are written as the exact value in DOUBLE form,
which LOAD DATA reads back to the identical FLOAT; and it writes BIT bytes
unescaped (a BIT byte equal to tab, newline or backslash would split or
corrupt the line), so BIT bytes are escaped like any string. A third difference
loads back as well: MariaDB's UUID and INET6 values are their 16 stored bytes
(what CAST AS BINARY gives), where INTO OUTFILE prints their text form.

With the C helper built (wire.py), the dump selects the columns themselves and
the helper writes the same lines; this SQL stays the server's way to build them,
for the dump without the helper and for every restore's checksum.

The table checksum is the row count plus SUM and BIT_XOR of CRC32(line) over
all rows. The line is an unambiguous encoding of every stored column with its
NULL flag, so two tables with the same definition agree only if their rows
agree (up to CRC collisions in both aggregates). The dump computes it from the
very lines it streams (no second scan); `table_checksum` computes the same
value with pure SQL on any table, which is how restores prove equality.
"""

from __future__ import annotations

import zlib

from backups.engine.errors import EngineError
from backups.engine.mysql import quote_ident, quote_qualified
from backups.engine.schema import PLAIN_TYPES, Column, table_columns

ALGORITHM = "crc32-sum-xor-outfile-line-v1"

try:  # ISA-L's CRC-32 (the same values as zlib's), several times faster on short lines
    from isal.isal_zlib import crc32 as line_crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    line_crc32 = zlib.crc32


# TEXT/BLOB/JSON values can be megabytes; nested REPLACE is quadratic in the number of
# matches on MariaDB (a 3 MB blob takes ~20 s), REGEXP_REPLACE is linear.
LONG_TYPES = frozenset(
    {
        "tinytext",
        "text",
        "mediumtext",
        "longtext",
        "tinyblob",
        "blob",
        "mediumblob",
        "longblob",
        "json",
    }
)


def binary_value(column: Column) -> str:
    """A column's stored value as the bytes its chunk line holds, before escaping."""
    ident = quote_ident(column.name)
    if column.data_type == "float":
        return f"CAST(CAST({ident} AS DOUBLE) AS BINARY)"
    return f"CAST({ident} AS BINARY)"


def column_expression(column: Column, *, regex: bool = True) -> str:
    value = binary_value(column)
    if column.data_type not in PLAIN_TYPES:  # those hold digits, signs, dots, colons only
        value = _escaped(value, regex=regex and column.data_type in LONG_TYPES)
    return f"IFNULL({value}, _binary'\\\\N')"


def _escaped(value: str, *, regex: bool) -> str:
    """`value` with a backslash before backslash, tab and newline, and NUL as `\\0`."""
    if regex:
        return (
            f"REGEXP_REPLACE(REGEXP_REPLACE({value},"
            r" _binary'([\\\\\t\n])', _binary'\\\\\\1'), _binary'\\x00', _binary'\\\\0')"
        )
    return (
        f"REPLACE(REPLACE(REPLACE(REPLACE({value},"
        " _binary'\\\\', _binary'\\\\\\\\'),"
        " _binary'\\t', _binary'\\\\\\t'),"
        " _binary'\\n', _binary'\\\\\\n'),"
        " _binary'\\0', _binary'\\\\0')"
    )


# Types whose text-protocol bytes, in a session with `character_set_results = binary`, are
# exactly their `binary_value`: the client path selects them bare, which spares the server a
# CAST per value. FLOAT (widened to DOUBLE), BIT, and every other type (UUID and INET6 send
# their text form, not the 16 bytes CAST gives) keep the CAST.
BARE_TYPES = (PLAIN_TYPES - {"float"}) | frozenset(
    {"char", "varchar", "binary", "varbinary", "enum", "set"} | LONG_TYPES
)


def client_select_list(columns: list[Column]) -> str:
    """The select list whose rows the C helper turns into chunk lines (wire.py): each
    column's `binary_value` bytes, unescaped; escaping, `\\N` and the tabs happen in the
    client, which yields the very bytes of `line_expression`. The session must have
    `character_set_results = binary` (no conversion of the bare string columns)."""
    if not columns:
        raise ValueError("a table needs at least one stored column")
    return ", ".join(
        quote_ident(c.name) if c.data_type in BARE_TYPES else binary_value(c) for c in columns
    )


def line_expression(columns: list[Column], *, regex: bool = True) -> str:
    """SQL that yields one row's chunk line (without the trailing newline).

    `regex`: the server has a byte-safe REGEXP_REPLACE (MariaDB); both forms yield the
    same bytes.
    """
    if not columns:
        raise ValueError("a table needs at least one stored column")
    if len(columns) == 1:
        return column_expression(columns[0], regex=regex)
    return (
        "CONCAT_WS(_binary'\\t', "
        + ", ".join(column_expression(c, regex=regex) for c in columns)
        + ")"
    )


def server_has_byte_regex(conn) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        return "mariadb" in str(cur.fetchone()[0]).lower()


class ChecksumAccumulator:
    """Order-independent aggregate of lines; chunks combine by `merge`."""

    __slots__ = ("rows", "crc_sum", "crc_xor")

    def __init__(self) -> None:
        self.rows = 0
        self.crc_sum = 0
        self.crc_xor = 0

    def add(self, line: bytes) -> None:
        crc = line_crc32(line)
        self.rows += 1
        self.crc_sum += crc
        self.crc_xor ^= crc

    def merge(self, other: ChecksumAccumulator) -> None:
        self.rows += other.rows
        self.crc_sum += other.crc_sum
        self.crc_xor ^= other.crc_xor

    @property
    def value(self) -> str:
        return format_checksum(self.crc_sum, self.crc_xor)


def format_checksum(crc_sum: int, crc_xor: int) -> str:
    return f"{int(crc_sum):x}-{int(crc_xor):08x}"


def table_checksum(
    conn, database: str, table: str, columns: list[str] | None = None
) -> tuple[int, str]:
    """(rows, checksum) of a table computed entirely by the server.

    `columns` names the stored columns in order (the manifest's list); None means
    every non-generated column of the table as it is now.
    """
    stored, _ = table_columns(conn, database, table)
    if columns is not None:
        by_name = {c.name: c for c in stored}
        missing = [name for name in columns if name not in by_name]
        if missing:
            raise EngineError(f"table {database}.{table} has no column(s) {', '.join(missing)}")
        stored = [by_name[name] for name in columns]
    mariadb = server_has_byte_regex(conn)
    line = line_expression(stored, regex=mariadb)
    source = quote_qualified(database, table)
    if mariadb:
        # Build each line once: MariaDB adds aggregates in select-list order, so BIT_XOR
        # sees the CRC that SUM just stored (a derived table would evaluate the line twice,
        # ~40% slower). Keep the aggregates bare: wrapping them (IFNULL) changes that order.
        # A wrong order could only ever report a mismatch, never hide one.
        sql = (
            f"SELECT COUNT(*), SUM(@sv_crc := CRC32({line})), BIT_XOR(@sv_crc)"  # noqa: S608
            f" FROM {source}"
        )
    else:
        sql = (
            f"SELECT COUNT(*), IFNULL(SUM(CRC32(l)), 0), IFNULL(BIT_XOR(CRC32(l)), 0)"  # noqa: S608
            f" FROM (SELECT {line} AS l FROM {source}) AS chunk_lines"
        )
    with conn.cursor() as cur:
        cur.execute(sql)
        rows, crc_sum, crc_xor = cur.fetchone()
    crc_sum = crc_sum or 0  # SUM over no rows is NULL
    crc_xor = crc_xor or 0
    return int(rows), format_checksum(int(crc_sum), int(crc_xor))
