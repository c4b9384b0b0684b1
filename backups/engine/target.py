"""The SQL a restore runs against its target servers, outside loading itself.

Probing which tables exist and which hold rows, dropping shadow tables, making a
resumed table agree with its recorded chunks, and the atomic `RENAME TABLE` swap of
an `inplace` restore. Plain functions over an `Endpoint` and names: every identifier
is quoted with `quote_ident` / `quote_qualified`. Connection failures raise
`ConnectError` (from `connect`).
"""

from __future__ import annotations

from backups.engine.mysql import METADATA_TIMEOUT_SECONDS, Endpoint, connect, quote_qualified


def _probe_connection(endpoint: Endpoint):
    """For the probes below: every read and write bounded, so a server that stops answering
    fails the plan with a sentence instead of hanging it."""
    return connect(
        endpoint, read_timeout=METADATA_TIMEOUT_SECONDS, write_timeout=METADATA_TIMEOUT_SECONDS
    )


def existing_tables(endpoint: Endpoint, database: str) -> set[str] | None:
    """Tables of `database`, or None when the database does not exist."""
    conn = _probe_connection(endpoint)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (database,)
            )
            if cur.fetchone() is None:
                return None
            cur.execute(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
                (database,),
            )
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def non_empty_tables(
    endpoint: Endpoint, database: str, tables: list[str], *, existing: set[str] | None = None
) -> list[str]:
    """Those of `tables` that exist in `database` and hold at least one row, in order.

    `existing` (the database's tables, from `existing_tables`) saves looking them up again.
    """
    conn = _probe_connection(endpoint)
    try:
        with conn.cursor() as cur:
            if existing is None:
                cur.execute(
                    "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
                    (database,),
                )
                existing = {row[0] for row in cur.fetchall()}
            full = []
            for table in tables:
                if table not in existing:
                    continue
                # EXISTS reads at most one row, however large the table.
                cur.execute(f"SELECT EXISTS (SELECT 1 FROM {quote_qualified(database, table)})")  # noqa: S608 - quoted identifiers
                row = cur.fetchone()
                if row is None or row[0]:  # no answer: treat as holding rows, never overwrite
                    full.append(table)
            return full
    finally:
        conn.close()


def tables_drop(endpoint: Endpoint, database: str, tables: list[str]) -> None:
    """DROP TABLE IF EXISTS each of `tables` (one statement); nothing to do for none."""
    if not tables:
        return
    conn = connect(endpoint, database)
    try:
        with conn.cursor() as cur:
            names = ", ".join(quote_qualified(database, t) for t in tables)
            cur.execute(f"DROP TABLE IF EXISTS {names}")
    finally:
        conn.close()


def table_truncate_unless_rows(endpoint: Endpoint, database: str, table: str, rows: int) -> bool:
    """Empty `table` unless it holds exactly `rows` rows; True when it was emptied."""
    conn = connect(endpoint, database)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {quote_qualified(database, table)}")  # noqa: S608 - quoted identifiers
            if int(cur.fetchone()[0]) == rows:
                return False
            cur.execute(f"TRUNCATE TABLE {quote_qualified(database, table)}")
            return True
    finally:
        conn.close()


def tables_swap(
    endpoint: Endpoint, database: str, renames: list[tuple[str, str]], drop: list[str]
) -> None:
    """Rename every `(old, new)` pair in one atomic RENAME TABLE, then drop `drop`.

    Either all the renames happen or none does; the drop runs only after they did.
    """
    conn = connect(endpoint, database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "RENAME TABLE "
                + ", ".join(
                    f"{quote_qualified(database, old)} TO {quote_qualified(database, new)}"
                    for old, new in renames
                )
            )
            if drop:
                cur.execute("DROP TABLE " + ", ".join(quote_qualified(database, t) for t in drop))
    finally:
        conn.close()
