"""Table and database-object DDL: read from a source, rewritten for a restore target.

Reads go through information_schema and `SHOW CREATE ...`; every identifier is
quoted with `quote_ident`. Nothing here holds rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from backups.engine.mysql import quote_ident, quote_qualified

# Column types whose text form can never contain a tab, newline, backslash or NUL,
# so the dump expression needs no escaping for them.
PLAIN_TYPES = frozenset(
    {
        "tinyint",
        "smallint",
        "mediumint",
        "int",
        "integer",
        "bigint",
        "decimal",
        "numeric",
        "double",
        "real",
        "float",
        "date",
        "datetime",
        "timestamp",
        "time",
        "year",
    }
)
INTEGER_TYPES = frozenset({"tinyint", "smallint", "mediumint", "int", "integer", "bigint"})

_AUTO_INCREMENT = re.compile(r"\s+AUTO_INCREMENT=\d+")
_LEADING_TABLE = re.compile(
    r"^(\s*CREATE\s+(?:TEMPORARY\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?)(`(?:[^`]|``)*`)", re.I
)
_DEFINER = re.compile(
    r"\s+DEFINER\s*=\s*(?:`(?:[^`]|``)*`|'(?:[^']|'')*'|[^\s@]+)(?:@(?:`(?:[^`]|``)*`|'(?:[^']|'')*'|[^\s]+))?",
    re.I,
)

# CREATE [DEFINER=...] EVENT `name` ON SCHEDULE ... ON COMPLETION [NOT] PRESERVE <status>
_EVENT_STATUS = re.compile(
    r"\s*CREATE\s+(?:DEFINER\s*=\s*(?:`(?:[^`]|``)*`|'(?:[^']|'')*'|[^\s@]+)"
    r"(?:@(?:`(?:[^`]|``)*`|'(?:[^']|'')*'|[^\s]+))?\s+)?EVENT\s+(?:`(?:[^`]|``)*`\.)?`(?:[^`]|``)*`"
    r"\s+ON\s+SCHEDULE\s+(?:'(?:[^'\\]|''|\\.)*'|[^'])*?"
    r"\s+ON\s+COMPLETION\s+(?:NOT\s+)?PRESERVE\s+"
    r"(?P<status>DISABLE\s+ON\s+(?:SLAVE|REPLICA)|ENABLE|DISABLE)\b",
    re.I | re.S,
)


@dataclass
class Column:
    name: str
    data_type: str  # lower-case DATA_TYPE, e.g. "varchar", "float"
    column_type: str


@dataclass
class TableInfo:
    """One base table as the dump needs it."""

    database: str
    name: str
    engine: str
    columns: list[Column]  # non-generated, in order
    primary_key: list[str]
    rows_estimate: int
    ddl: str = ""
    pk_types: list[str] = field(default_factory=list)

    @property
    def has_primary_key(self) -> bool:
        return bool(self.primary_key)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def list_base_tables(conn, database: str) -> list[tuple[str, str, int]]:
    """(name, engine, estimated rows) of every base table, by name."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT TABLE_NAME, IFNULL(ENGINE, ''), IFNULL(TABLE_ROWS, 0) FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
            (database,),
        )
        return [(name, engine, int(rows)) for name, engine, rows in cur.fetchall()]


def table_columns(conn, database: str, table: str) -> tuple[list[Column], list[Column]]:
    """(stored columns in order, generated columns)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT COLUMN_NAME, LOWER(DATA_TYPE), COLUMN_TYPE, IFNULL(IS_GENERATED, 'NEVER'), EXTRA"
            " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s"
            " ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        stored, generated = [], []
        for name, data_type, column_type, is_generated, extra in cur.fetchall():
            column = Column(name=name, data_type=data_type, column_type=column_type)
            if is_generated == "ALWAYS" or "GENERATED" in (extra or "").upper():
                generated.append(column)
            else:
                stored.append(column)
        return stored, generated


def primary_key(conn, database: str, table: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT COLUMN_NAME FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
            (database, table),
        )
        return [row[0] for row in cur.fetchall()]


def show_create_table(conn, database: str, table: str) -> str:
    with conn.cursor() as cur:
        cur.execute(f"SHOW CREATE TABLE {quote_qualified(database, table)}")
        return cur.fetchone()[1]


def describe_table(
    conn, database: str, table: str, engine: str = "", rows_estimate: int = 0
) -> TableInfo:
    columns, _ = table_columns(conn, database, table)
    pk = primary_key(conn, database, table)
    types = {c.name: c.data_type for c in columns}
    return TableInfo(
        database=database,
        name=table,
        engine=engine,
        columns=columns,
        primary_key=pk,
        rows_estimate=rows_estimate,
        ddl=show_create_table(conn, database, table),
        pk_types=[types.get(name, "") for name in pk],
    )


def ddl_fingerprint(ddl: str) -> str:
    """The DDL without the AUTO_INCREMENT counter, which moves with every insert."""
    return _AUTO_INCREMENT.sub("", ddl)


def rename_table_ddl(ddl: str, new_name: str) -> str:
    """Replace the table identifier that follows `CREATE TABLE`."""
    match = _LEADING_TABLE.match(ddl)
    if not match:
        raise ValueError("stored DDL does not start with CREATE TABLE `name`")
    return match.group(1) + quote_ident(new_name) + ddl[match.end() :]


def definer_of(ddl: str) -> str:
    """The `user@host` of the DDL's DEFINER clause, as written ("" when it has none)."""
    match = _DEFINER.search(ddl)
    return match.group(0).split("=", 1)[1].strip() if match else ""


def event_disabled(ddl: str) -> str:
    """`SHOW CREATE EVENT` DDL with its status clause made DISABLE, so a restored copy of an
    event never fires (side, instance and drill copies are not the production schedule).

    The status clause follows `ON COMPLETION [NOT] PRESERVE` in the header, before the body;
    only that one is rewritten. Raises ValueError when the header is not where it should be.
    """
    match = _EVENT_STATUS.match(ddl)
    if match is None:
        raise ValueError("stored event DDL has no ON COMPLETION ... ENABLE/DISABLE clause")
    return ddl[: match.start("status")] + "DISABLE" + ddl[match.end("status") :]


def retarget_database(ddl: str, source_database: str, target_database: str) -> str:
    """Point `source`.`x` references (views qualify every column) at the target database."""
    if source_database == target_database:
        return ddl
    return ddl.replace(quote_ident(source_database) + ".", quote_ident(target_database) + ".")


def database_objects(conn, database: str) -> dict[str, list[dict]]:
    """DDL of the views, triggers, routines and events of one database."""
    objects: dict[str, list[dict]] = {"views": [], "triggers": [], "routines": [], "events": []}
    with conn.cursor() as cur:
        cur.execute(
            "SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME",
            (database,),
        )
        for (name,) in cur.fetchall():
            cur.execute(f"SHOW CREATE VIEW {quote_qualified(database, name)}")
            row = cur.fetchone()
            objects["views"].append({"name": name, "ddl": row[1]})
        cur.execute(
            "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS"
            " WHERE TRIGGER_SCHEMA = %s ORDER BY EVENT_OBJECT_TABLE, ACTION_ORDER",
            (database,),
        )
        for name, table in cur.fetchall():
            cur.execute(f"SHOW CREATE TRIGGER {quote_qualified(database, name)}")
            row = cur.fetchone()
            objects["triggers"].append(
                {"name": name, "table": table, "sql_mode": row[1], "ddl": row[2]}
            )
        cur.execute(
            "SELECT ROUTINE_NAME, ROUTINE_TYPE FROM information_schema.ROUTINES"
            " WHERE ROUTINE_SCHEMA = %s ORDER BY ROUTINE_TYPE, ROUTINE_NAME",
            (database,),
        )
        for name, kind in cur.fetchall():
            if kind not in ("PROCEDURE", "FUNCTION"):
                continue
            cur.execute(f"SHOW CREATE {kind} {quote_qualified(database, name)}")
            row = cur.fetchone()
            objects["routines"].append(
                {"name": name, "type": kind, "sql_mode": row[1], "ddl": row[2]}
            )
        cur.execute(
            "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = %s ORDER BY EVENT_NAME",
            (database,),
        )
        for (name,) in cur.fetchall():
            cur.execute(f"SHOW CREATE EVENT {quote_qualified(database, name)}")
            row = cur.fetchone()
            objects["events"].append({"name": name, "sql_mode": row[1], "ddl": row[3]})
    return objects
