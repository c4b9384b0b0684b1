"""Row images of binlog row events: how many rows each carries, and their column values.

Plain Python (no Django). The browser only counts rows (`count_rows`, which walks the
images by their sizes without building values); flashback's conflict check needs the
after image of each changed row (`row_images`), read column by column. Nothing here
writes or inverts events: the inverse SQL comes from `mariadb-binlog --flashback`.

Values come back in a form the server compares exactly with `<=>` (see `ColumnValue`):
integers, `Decimal`, bytes for every string and blob, and text for dates and times.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from backups.engine.binlog_events import HEADER_LEN
from backups.engine.errors import EngineError

# Rows events: v1 (MariaDB's default) and v2, write / update / delete.
WRITE_ROWS = frozenset({23, 30})
UPDATE_ROWS = frozenset({24, 31})
DELETE_ROWS = frozenset({25, 32})
COMPRESSED_ROWS = frozenset({166, 167, 168, 169, 170, 171})
ROWS_EVENTS = WRITE_ROWS | UPDATE_ROWS | DELETE_ROWS | COMPRESSED_ROWS
STMT_END_F = 1

# Column types (include/mysql_com.h).
T_DECIMAL, T_TINY, T_SHORT, T_LONG, T_FLOAT, T_DOUBLE, T_NULL, T_TIMESTAMP = range(8)
T_LONGLONG, T_INT24, T_DATE, T_TIME, T_DATETIME, T_YEAR, T_NEWDATE, T_VARCHAR = range(8, 16)
T_BIT, T_TIMESTAMP2, T_DATETIME2, T_TIME2 = 16, 17, 18, 19
T_BLOB_COMPRESSED, T_VARCHAR_COMPRESSED = 140, 141
T_JSON, T_NEWDECIMAL, T_ENUM, T_SET = 245, 246, 247, 248
T_TINY_BLOB, T_MEDIUM_BLOB, T_LONG_BLOB, T_BLOB = 249, 250, 251, 252
T_VAR_STRING, T_STRING, T_GEOMETRY = 253, 254, 255
_FIXED = {
    T_TINY: 1,
    T_SHORT: 2,
    T_INT24: 3,
    T_LONG: 4,
    T_LONGLONG: 8,
    T_FLOAT: 4,
    T_DOUBLE: 8,
    T_NULL: 0,
    T_TIMESTAMP: 4,
    T_DATE: 3,
    T_TIME: 3,
    T_DATETIME: 8,
    T_YEAR: 1,
    T_NEWDATE: 3,
}
_DIG2BYTES = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4)


def packed_int(data: bytes | memoryview, offset: int) -> tuple[int, int]:
    """A length-encoded integer at `offset` -> (value, next offset)."""
    first = data[offset]
    if first < 251:
        return first, offset + 1
    if first == 252:
        return int.from_bytes(data[offset + 1 : offset + 3], "little"), offset + 3
    if first == 253:
        return int.from_bytes(data[offset + 1 : offset + 4], "little"), offset + 4
    return int.from_bytes(data[offset + 1 : offset + 9], "little"), offset + 9


@dataclass(frozen=True)
class Column:
    type: int
    meta: int  # type-specific; for STRING: real type << 8 | length byte
    size_hint: int  # fixed size, or -1 when it depends on the value


@dataclass(frozen=True)
class TableMap:
    table_id: int
    database: str
    table: str
    columns: tuple[Column, ...]


def _decimal_size(precision: int, scale: int) -> int:
    integral = precision - scale
    return (integral // 9) * 4 + _DIG2BYTES[integral % 9] + (scale // 9) * 4 + _DIG2BYTES[scale % 9]


def _column(kind: int, meta: int) -> Column:
    if kind in _FIXED:
        return Column(kind, meta, _FIXED[kind])
    if kind in (T_TIMESTAMP2, T_DATETIME2, T_TIME2):
        base = {T_TIMESTAMP2: 4, T_DATETIME2: 5, T_TIME2: 3}[kind]
        return Column(kind, meta, base + (meta + 1) // 2)
    if kind == T_NEWDECIMAL:
        return Column(kind, meta, _decimal_size(meta >> 8, meta & 0xFF))
    if kind == T_BIT:
        bits, whole = meta & 0xFF, meta >> 8
        return Column(kind, meta, whole + (1 if bits else 0))
    if kind in (T_STRING, T_ENUM, T_SET):
        real, length = meta >> 8, meta & 0xFF
        if real and (real & 0x30) != 0x30:
            length |= ((real & 0x30) ^ 0x30) << 4
            real |= 0x30
        if real in (T_ENUM, T_SET):
            return Column(real, length, length)
        return Column(T_STRING, length, -1)
    return Column(kind, meta, -1)


def table_map_parse(event: bytes, post_header_len: int) -> TableMap:
    """The table id, names and column types of a TABLE_MAP event."""
    table_id = int.from_bytes(event[HEADER_LEN : HEADER_LEN + 6], "little")
    offset = HEADER_LEN + post_header_len
    db_len = event[offset]
    database = event[offset + 1 : offset + 1 + db_len].decode("utf-8", "replace")
    offset += 1 + db_len + 1
    table_len = event[offset]
    table = event[offset + 1 : offset + 1 + table_len].decode("utf-8", "replace")
    offset += 1 + table_len + 1
    count, offset = packed_int(event, offset)
    kinds = event[offset : offset + count]
    offset += count
    _meta_len, offset = packed_int(event, offset)
    columns = []
    for kind in kinds:
        if kind in (T_FLOAT, T_DOUBLE, T_BLOB, T_GEOMETRY, T_JSON, T_BLOB_COMPRESSED) or kind in (
            T_TIMESTAMP2,
            T_DATETIME2,
            T_TIME2,
        ):
            meta = event[offset]
            offset += 1
        elif kind in (T_VARCHAR, T_VAR_STRING, T_BIT, T_VARCHAR_COMPRESSED):
            meta = int.from_bytes(event[offset : offset + 2], "little")
            if kind == T_BIT:
                meta = event[offset + 1] << 8 | event[offset]  # bytes << 8 | bits
            offset += 2
        elif kind in (T_NEWDECIMAL, T_STRING, T_ENUM, T_SET):
            meta = event[offset] << 8 | event[offset + 1]  # precision, scale / real type, length
            offset += 2
        else:
            meta = 0
        columns.append(_column(kind, meta))
    return TableMap(table_id, database, table, tuple(columns))


def rows_table_id(event: bytes) -> int:
    return int.from_bytes(event[HEADER_LEN : HEADER_LEN + 6], "little")


def rows_flags(event: bytes) -> int:
    return int.from_bytes(event[HEADER_LEN + 6 : HEADER_LEN + 8], "little")


class _Reader:
    """Walks the row images of one rows event."""

    def __init__(self, event: bytes, post_header_len: int, checksum: bool):
        self.data = memoryview(event)
        self.end = len(event) - (4 if checksum else 0)
        offset = HEADER_LEN + post_header_len
        if post_header_len == 10:  # v2: extra data after the flags
            extra = int.from_bytes(event[HEADER_LEN + 8 : HEADER_LEN + 10], "little")
            offset = HEADER_LEN + 8 + extra
        self.count, offset = packed_int(event, offset)
        width = (self.count + 7) // 8
        self.present = self.data[offset : offset + width]
        offset += width
        kind = event[4]
        self.present_after = self.present
        if kind in UPDATE_ROWS:
            self.present_after = self.data[offset : offset + width]
            offset += width
        self.offset = offset

    def image(self, columns: tuple[Column, ...], present, decode: bool) -> tuple | None:
        data = self.data
        used = [i for i in range(self.count) if present[i >> 3] & (1 << (i & 7))]
        nulls_at = self.offset
        self.offset += (len(used) + 7) // 8
        values = [None] * self.count if decode else None
        for n, i in enumerate(used):
            if data[nulls_at + (n >> 3)] & (1 << (n & 7)):
                continue
            column = columns[i]
            size = column.size_hint
            start = self.offset
            if size < 0:
                size, start = _variable_size(column, data, start)
            if decode:
                values[i] = _value(column, bytes(data[start : start + size]))
            self.offset = start + size
        return tuple(values) if decode else None


def _variable_size(column: Column, data, offset: int) -> tuple[int, int]:
    kind = column.type
    if kind in (T_VARCHAR, T_VAR_STRING, T_VARCHAR_COMPRESSED):
        width = 1 if column.meta < 256 else 2
    elif kind == T_STRING:
        width = 1 if column.meta < 256 else 2
    elif kind in (T_BLOB, T_GEOMETRY, T_JSON, T_BLOB_COMPRESSED, T_TINY_BLOB, T_MEDIUM_BLOB):
        width = column.meta
    else:
        raise EngineError(f"binlog column type {kind} is not supported")
    return int.from_bytes(data[offset : offset + width], "little"), offset + width


def count_rows(event: bytes, table_map: TableMap, post_header_len: int, checksum: bool) -> int:
    """How many rows a rows event carries (an update counts once)."""
    if event[4] in COMPRESSED_ROWS:
        raise EngineError("compressed binlog row events (log_bin_compress) are not supported")
    reader = _Reader(event, post_header_len, checksum)
    update = event[4] in UPDATE_ROWS
    rows = 0
    while reader.offset < reader.end:
        reader.image(table_map.columns, reader.present, False)
        if update:
            reader.image(table_map.columns, reader.present_after, False)
        rows += 1
    return rows


def row_images(
    event: bytes, table_map: TableMap, post_header_len: int, checksum: bool
) -> Iterator[tuple[tuple | None, tuple | None]]:
    """(before image, after image) per row: (None, row) insert, (row, None) delete."""
    if event[4] in COMPRESSED_ROWS:
        raise EngineError("compressed binlog row events (log_bin_compress) are not supported")
    reader = _Reader(event, post_header_len, checksum)
    kind = event[4]
    columns = table_map.columns
    while reader.offset < reader.end:
        first = reader.image(columns, reader.present, True)
        if kind in UPDATE_ROWS:
            yield first, reader.image(columns, reader.present_after, True)
        elif kind in WRITE_ROWS:
            yield None, first
        else:
            yield first, None


# -- values ----------------------------------------------------------------------------


def _fraction(raw: bytes, fsp: int) -> int:
    """Microseconds from the big-endian fractional part of a TIME2/DATETIME2/TIMESTAMP2."""
    if not fsp:
        return 0
    value = int.from_bytes(raw, "big")
    return value * {1: 10000, 2: 10000, 3: 100, 4: 100, 5: 1, 6: 1}[fsp]


def _decimal(raw: bytes, precision: int, scale: int) -> Decimal:
    data = bytearray(raw)
    negative = not data[0] & 0x80
    data[0] ^= 0x80
    if negative:
        data = bytearray(b ^ 0xFF for b in data)
    integral = precision - scale
    offset = 0
    text = "-" if negative else ""
    head = _DIG2BYTES[integral % 9]
    digits = str(int.from_bytes(data[offset : offset + head], "big")) if head else "0"
    offset += head
    for _ in range(integral // 9):
        digits += f"{int.from_bytes(data[offset : offset + 4], 'big'):09d}"
        offset += 4
    text += digits + "."
    for _ in range(scale // 9):
        text += f"{int.from_bytes(data[offset : offset + 4], 'big'):09d}"
        offset += 4
    tail = _DIG2BYTES[scale % 9]
    if tail:
        text += f"{int.from_bytes(data[offset : offset + tail], 'big'):0{scale % 9}d}"
    return Decimal(text.rstrip(".") if text.endswith(".") else text)


def _time2(raw: bytes, fsp: int) -> str:
    int_ofs = 0x800000
    if fsp in (5, 6):
        packed = int.from_bytes(raw[:6], "big") - 0x800000000000
    else:
        intpart = int.from_bytes(raw[:3], "big") - int_ofs
        frac = 0
        if fsp in (1, 2):
            frac = raw[3]
            if intpart < 0 and frac:
                intpart, frac = intpart + 1, frac - 0x100
            frac *= 10000
        elif fsp in (3, 4):
            frac = int.from_bytes(raw[3:5], "big")
            if intpart < 0 and frac:
                intpart, frac = intpart + 1, frac - 0x10000
            frac *= 100
        packed = (intpart << 24) + frac
    sign = "-" if packed < 0 else ""
    packed = abs(packed)
    hms, micro = packed >> 24, packed % (1 << 24)
    hour, minute, second = (hms >> 12) % (1 << 10), (hms >> 6) % 64, hms % 64
    return f"{sign}{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}"


def _value(column: Column, raw: bytes):
    kind = column.type
    if kind in (T_TINY, T_SHORT, T_INT24, T_LONG, T_LONGLONG):
        return int.from_bytes(raw, "little")  # unsigned here; `signed_value` fixes the sign
    if kind == T_FLOAT:
        return struct.unpack("<f", raw)[0]
    if kind == T_DOUBLE:
        return struct.unpack("<d", raw)[0]
    if kind == T_YEAR:
        return raw[0] + 1900 if raw[0] else 0
    if kind in (T_DATE, T_NEWDATE):
        value = int.from_bytes(raw, "little")
        return f"{value >> 9:04d}-{(value >> 5) & 15:02d}-{value & 31:02d}"
    if kind == T_TIMESTAMP:
        return Decimal(int.from_bytes(raw, "little"))
    if kind == T_TIMESTAMP2:
        micro = _fraction(raw[4:], column.meta)
        return Decimal(int.from_bytes(raw[:4], "big")) + Decimal(micro) / Decimal(1000000)
    if kind == T_DATETIME:
        v = int.from_bytes(raw, "little")
        date, time = divmod(v, 1000000)
        return (
            f"{date // 10000:04d}-{date // 100 % 100:02d}-{date % 100:02d} "
            f"{time // 10000:02d}:{time // 100 % 100:02d}:{time % 100:02d}"
        )
    if kind == T_DATETIME2:
        v = int.from_bytes(raw[:5], "big")
        ym = (v >> 22) & 0x1FFFF
        micro = _fraction(raw[5:], column.meta)
        return (
            f"{ym // 13:04d}-{ym % 13:02d}-{(v >> 17) & 31:02d} "
            f"{(v >> 12) & 31:02d}:{(v >> 6) & 63:02d}:{v & 63:02d}.{micro:06d}"
        )
    if kind == T_TIME:
        v = int.from_bytes(raw, "little")
        return f"{v // 10000:02d}:{v // 100 % 100:02d}:{v % 100:02d}"
    if kind == T_TIME2:
        return _time2(raw, column.meta)
    if kind == T_NEWDECIMAL:
        return _decimal(raw, column.meta >> 8, column.meta & 0xFF)
    if kind in (T_ENUM, T_SET, T_BIT):
        return int.from_bytes(raw, "little" if kind != T_BIT else "big")
    if kind in (T_BLOB_COMPRESSED, T_VARCHAR_COMPRESSED):
        raise EngineError("compressed columns cannot be compared for flashback conflicts")
    return raw  # strings, blobs, JSON, geometry: the stored bytes


def signed_value(value, column: Column, unsigned: bool):
    """An integer column's value with its sign (the binlog stores the bits only)."""
    if unsigned or not isinstance(value, int) or column.type not in _INT_BITS:
        return value
    bits = _INT_BITS[column.type]
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


_INT_BITS = {T_TINY: 8, T_SHORT: 16, T_INT24: 24, T_LONG: 32, T_LONGLONG: 64}


def comparison_sql(column: Column, quoted: str) -> str:
    """The SQL expression of a live column that compares exactly with a decoded value."""
    if column.type in (T_ENUM, T_SET, T_BIT):
        return f"({quoted} + 0)"
    if column.type in (T_TIMESTAMP, T_TIMESTAMP2):
        return f"UNIX_TIMESTAMP({quoted})"
    if column.type in _FIXED or column.type in (T_DATETIME2, T_TIME2, T_NEWDECIMAL):
        return quoted
    return f"CAST({quoted} AS BINARY)"
