"""Policy exclusions: `database.table` glob patterns of tables never dumped or restored.

Plain Python (no Django). A pattern is `database.table`, each side an `fnmatch` glob
(`*`, `?`, `[seq]`): `scratch.*`, `*.tmp_*`, `app.audit_log`. It splits at its first dot,
so a `*` never reaches across the dot (`*.tmp_?` does not match table `x.tmp_1`); the
policy service checks each pattern has that form.

Names compare as the server compares them: case-sensitively where
`lower_case_table_names` is 0 (the Linux default), case-insensitively otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class Exclusions:
    """The policy's exclusion patterns, as one server compares table names."""

    patterns: tuple[str, ...] = ()
    case_sensitive: bool = True

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excludes(self, database: str, table: str) -> bool:
        """Whether `database`.`table` matches any pattern."""
        if not self.case_sensitive:
            database, table = database.lower(), table.lower()
        for pattern in self.patterns:
            if not self.case_sensitive:
                pattern = pattern.lower()
            database_glob, _, table_glob = pattern.partition(".")
            if fnmatchcase(database, database_glob) and fnmatchcase(table, table_glob):
                return True
        return False

    def split(self, database: str, tables: Iterable[str]) -> tuple[list[str], list[str]]:
        """(kept, excluded) of `tables` in `database`, each in the given order."""
        kept, excluded = [], []
        for table in tables:
            (excluded if self.excludes(database, table) else kept).append(table)
        return kept, excluded


def exclusions_for_server(patterns: Iterable[str], conn) -> Exclusions:
    """`Exclusions` for the server behind `conn` (reads `lower_case_table_names`)."""
    patterns = tuple(patterns)
    if not patterns:
        return Exclusions()
    case_sensitive = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@lower_case_table_names")
            row = cur.fetchone()
            case_sensitive = not (row and int(row[0] or 0))
    except Exception:  # noqa: BLE001 - the Linux default is case-sensitive
        case_sensitive = True
    return Exclusions(patterns, case_sensitive)
