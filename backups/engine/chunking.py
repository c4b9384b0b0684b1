"""Split a table into primary-key ranges that together cover every row exactly once.

Ranges are half-open `[lower, upper)` on the primary key; the first range has no
lower bound and the last no upper bound, so rows outside the planned span (or a
bad row estimate) can never fall through a gap. Two strategies:

* integer first PK column: fixed-width ranges of that column between its MIN
  and MAX, as many as the row estimate divided by the target chunk size;
* anything else (strings, composite keys): keyset boundaries found one at a
  time with `ORDER BY pk LIMIT 1 OFFSET n`, so a 10-row and a 10M-row table
  both work and no boundary list is ever materialised.

Tables without a primary key are one range (a full scan).
A `TablePlan` hands out ranges to several dump threads; boundary queries run on
the asking thread's snapshot connection.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backups.engine.mysql import quote_ident, quote_qualified
from backups.engine.schema import INTEGER_TYPES, TableInfo

Literal = Callable[[Any], str]  # a value -> its SQL literal (PyMySQL's `conn.escape`)


@dataclass(frozen=True)
class ChunkRange:
    index: int  # 1-based
    columns: tuple[str, ...]  # the key columns the bounds refer to
    lower: tuple | None  # inclusive
    upper: tuple | None  # exclusive

    def where(self, literal: Literal) -> str:
        """SQL condition selecting exactly this range, its values already written as literals by
        `literal` (the connection's `conn.escape`, which PyMySQL itself uses to bind values).

        The statement is then run without parameters: PyMySQL's `%`-formatting never sees an
        identifier, so a table or column named `100%_off` or `a%sb` is read as itself."""
        parts = []
        if self.lower is not None:
            parts.append(_compare(self.columns, self.lower, ">=", literal))
        if self.upper is not None:
            parts.append(_compare(self.columns, self.upper, "<", literal))
        return " AND ".join(parts) or "1=1"


def _compare(columns: tuple[str, ...], values: tuple, op: str, literal: Literal) -> str:
    """Row comparison `(c1, c2, ...) op (v1, v2, ...)` expanded so index ranges apply.

    (a, b) >= (x, y)  <=>  a > x OR (a = x AND b >= y)
    """
    strict = op[0]  # ">" or "<"
    head, value = quote_ident(columns[0]), literal(values[0])
    if len(columns) == 1:
        return f"{head} {op} {value}"
    rest = _compare(columns[1:], values[1:], op, literal)
    return f"({head} {strict} {value} OR ({head} = {value} AND {rest}))"


class TablePlan:
    """Thread-safe generator of a table's chunk ranges."""

    def __init__(self, table: TableInfo, chunk_rows: int):
        self.table = table
        self.chunk_rows = max(1, int(chunk_rows))
        self._lock = threading.Lock()
        self._started = False
        self._done = False
        self._next_index = 1
        # integer strategy
        self._step = 0
        self._low = 0
        self._count = 0
        # keyset strategy
        self._cursor: tuple | None = None
        self.strategy = self._choose()

    def _choose(self) -> str:
        if not self.table.primary_key:
            return "single"
        if self.table.pk_types and self.table.pk_types[0] in INTEGER_TYPES:
            return "integer"
        return "keyset"

    @property
    def exhausted(self) -> bool:
        return self._done

    def next_range(self, conn) -> ChunkRange | None:
        """The next range to dump, or None when the table is fully handed out."""
        with self._lock:
            if self._done:
                return None
            if not self._started:
                self._started = True
                if self.strategy == "integer":
                    self._plan_integer(conn)
            chunk = getattr(self, f"_next_{self.strategy}")(conn)
            if chunk is None:
                self._done = True
            return chunk

    def _emit(self, columns, lower, upper, last: bool) -> ChunkRange:
        chunk = ChunkRange(index=self._next_index, columns=tuple(columns), lower=lower, upper=upper)
        self._next_index += 1
        if last:
            self._done = True
        return chunk

    def _next_single(self, conn) -> ChunkRange | None:
        return self._emit((), None, None, last=True)

    def _plan_integer(self, conn) -> None:
        column = quote_ident(self.table.primary_key[0])
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT MIN({column}), MAX({column}) FROM {quote_qualified(self.table.database, self.table.name)}"  # noqa: S608
            )
            low, high = cur.fetchone()
        if low is None:
            self._count = 1
            return
        low, high = int(low), int(high)
        pieces = max(1, math.ceil(max(self.table.rows_estimate, 1) / self.chunk_rows))
        width = high - low + 1
        pieces = min(pieces, width)
        self._low = low
        self._step = math.ceil(width / pieces)
        self._count = math.ceil(width / self._step)

    def _next_integer(self, conn) -> ChunkRange | None:
        i = self._next_index - 1
        if i >= self._count:
            return None
        columns = (self.table.primary_key[0],)
        lower = None if i == 0 else (self._low + i * self._step,)
        last = i == self._count - 1
        upper = None if last else (self._low + (i + 1) * self._step,)
        return self._emit(columns, lower, upper, last=last)

    def _next_keyset(self, conn) -> ChunkRange | None:
        pk = tuple(self.table.primary_key)
        lower = self._cursor
        chunk_range = ChunkRange(0, pk, lower, None)
        where = chunk_range.where(conn.escape)
        order = ", ".join(quote_ident(c) for c in pk)
        with conn.cursor() as cur:
            cur.execute(  # no parameters: identifiers never go through %-formatting
                f"SELECT {order} FROM {quote_qualified(self.table.database, self.table.name)}"  # noqa: S608
                f" WHERE {where} ORDER BY {order} LIMIT 1 OFFSET {int(self.chunk_rows)}"
            )
            row = cur.fetchone()
        if row is None:
            return self._emit(pk, lower, None, last=True)
        self._cursor = tuple(row)
        return self._emit(pk, lower, self._cursor, last=False)
