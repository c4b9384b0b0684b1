"""Policy exclusions: `database.table` glob patterns of tables never dumped or restored.

Plain Python (no Django). A pattern is an `fnmatch` glob (`*`, `?`, `[seq]`) matched
against the whole `database.table` name, so `scratch.*`, `*.tmp_*` and `app.audit_log`
all work (the policy service checks each pattern has the database.table form).

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
        if not self.patterns:
            return False
        name = f"{database}.{table}"
        if self.case_sensitive:
            return any(fnmatchcase(name, pattern) for pattern in self.patterns)
        name = name.lower()
        return any(fnmatchcase(name, pattern.lower()) for pattern in self.patterns)

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
