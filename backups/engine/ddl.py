"""What a statement logged as a binlog QUERY event does to tables, read from its tokens.

Plain Python (no Django). sqlparse's lexer splits the statement into tokens (quoted
names, strings and comments are never mistaken for names); a small grammar over those
tokens reads the statement kind and the tables it changes or reads, with the character
span of each name so a caller can rewrite exactly those names and nothing else.

`ddl_analyse(text)` -> `Ddl`. It never decides scope; `binlog_select.Scope` does, with
the QUERY event's default database. Whatever the grammar does not know is `UNKNOWN`,
and callers treat unknown statements near their data as refused, never as harmless.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlparse import lexer, tokens

# Statement kinds.
TABLE = "table"  # changes tables: ALTER/CREATE/DROP/TRUNCATE TABLE, CREATE/DROP INDEX
RENAME = "rename"  # RENAME TABLE a TO b[, c TO d]
TEMPORARY = "temporary"  # temporary tables: session-local, nothing to restore
HARMLESS = "harmless"  # maintenance and server-level statements: no table data or shape
TRANSACTION = "transaction"  # SAVEPOINT, ROLLBACK TO, RELEASE SAVEPOINT, XA
DATABASE = "database"  # CREATE/ALTER/DROP DATABASE
OBJECT = "object"  # views, triggers, routines, events, sequences
DML = "dml"  # a row change logged as a statement (binlog_format not ROW)
UNKNOWN = "unknown"

CHANGES = "changes"
READS = "reads"

_HARMLESS_HEADS = {
    "ANALYZE",
    "OPTIMIZE",
    "REPAIR",
    "CHECK",
    "CHECKSUM",
    "FLUSH",
    "RESET",
    "PURGE",
    "GRANT",
    "REVOKE",
    "INSTALL",
    "UNINSTALL",
    "KILL",
    "SHUTDOWN",
    "DO",
}
_ACCOUNT_OBJECTS = {"USER", "ROLE", "SERVER", "LOGFILE", "TABLESPACE"}
_OBJECTS = {"VIEW", "TRIGGER", "PROCEDURE", "FUNCTION", "EVENT", "SEQUENCE", "PACKAGE"}
_DML_HEADS = {"INSERT", "UPDATE", "DELETE", "REPLACE", "LOAD", "CALL", "HANDLER"}
_NAME = re.compile(r"[0-9A-Za-z_$\u0080-\U0010ffff]+")
_EXECUTABLE_COMMENT = re.compile(r"/\*M?!\d*")


@dataclass(frozen=True)
class TableRef:
    """A table named by the statement; `database` is None when the name is unqualified."""

    database: str | None
    table: str
    start: int  # character span of the whole (qualified) name in the statement
    end: int
    role: str = CHANGES

    def resolved(self, default_database: str) -> str:
        return self.database if self.database is not None else default_database


@dataclass
class Ddl:
    kind: str
    head: str = ""
    refs: list[TableRef] = field(default_factory=list)
    renames: list[tuple[TableRef, TableRef]] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)  # DATABASE kind: the database named
    # Qualified names the grammar did not place (in expressions, options...): a caller that
    # finds its database among them must not treat the statement as understood.
    stray: list[TableRef] = field(default_factory=list)
    creates_like: bool = False


@dataclass(frozen=True)
class _Tok:
    kind: str  # "word" (bare word or keyword), "quoted" (`name`), "punct", "other"
    value: str  # a quoted name unquoted; keywords upper-cased with single spaces
    start: int
    end: int


def _unhide_executable_comments(text: str) -> str:
    """`/*!50100 PARTITION ... */` and `/*M! ... */` run on the server: read their content.

    The markers become spaces of the same length, so spans still index the original text.
    """
    out = list(text)
    for match in _EXECUTABLE_COMMENT.finditer(text):
        close = text.find("*/", match.end())
        if close < 0:
            break
        out[match.start() : match.end()] = " " * (match.end() - match.start())
        out[close : close + 2] = "  "
    return "".join(out)


def _tokens(text: str) -> list[_Tok]:
    result = []
    offset = 0
    for ttype, value in lexer.tokenize(_unhide_executable_comments(text)):
        start, offset = offset, offset + len(value)
        if ttype in tokens.Text or ttype in tokens.Comment:
            continue
        if ttype in tokens.Name and value.startswith("`") and value.endswith("`"):
            result.append(_Tok("quoted", value[1:-1].replace("``", "`"), start, offset))
        elif ttype in tokens.Punctuation:
            result.append(_Tok("punct", value, start, offset))
        elif (ttype in tokens.Keyword or ttype in tokens.Name) and _NAME.fullmatch(value):
            result.append(_Tok("word", value, start, offset))
        elif ttype in tokens.Keyword or ttype in tokens.Operator.Comparison:
            result.append(_Tok("word", " ".join(value.upper().split()), start, offset))
        else:
            result.append(_Tok("other", value, start, offset))
    return result


class _Reader:
    def __init__(self, toks: list[_Tok]):
        self.toks = toks
        self.i = 0

    def peek(self, ahead: int = 0) -> _Tok | None:
        j = self.i + ahead
        return self.toks[j] if j < len(self.toks) else None

    def word(self, ahead: int = 0) -> str:
        tok = self.peek(ahead)
        return tok.value.upper() if tok is not None and tok.kind == "word" else ""

    def accept(self, *words: str) -> str:
        if self.word() in words:
            self.i += 1
            return self.toks[self.i - 1].value.upper()
        return ""

    def skip_object_options(self) -> None:
        """`OR REPLACE`, `DEFINER = x@y`, `ALGORITHM = MERGE`, `SQL SECURITY ...` before the object."""
        if self.word() not in ("OR REPLACE", "OR", "DEFINER", "ALGORITHM", "SQL SECURITY", "SQL"):
            return
        for ahead in range(1, 16):
            if self.word(ahead) in _OBJECTS or self.word(ahead) in ("TABLE", "TEMPORARY", "INDEX"):
                if self.word(ahead - 1) not in ("=",):
                    self.i += ahead
                    return

    def _punct_at(self, ahead: int, value: str) -> bool:
        tok = self.peek(ahead)
        return tok is not None and tok.value == value and tok.kind in ("punct", "other", "word")

    def name(self, role: str = CHANGES) -> TableRef | None:
        """A (database.)table name at the cursor, or None."""
        first = self.peek()
        if first is None or first.kind not in ("word", "quoted"):
            return None
        if first.kind == "word" and not _NAME.fullmatch(first.value):
            return None
        dot, second = self.peek(1), self.peek(2)
        if (
            dot is not None
            and dot.value == "."
            and dot.start == first.end
            and second is not None
            and second.kind in ("word", "quoted")
            and second.start == dot.end
        ):
            self.i += 3
            return TableRef(first.value, second.value, first.start, second.end, role)
        self.i += 1
        return TableRef(None, first.value, first.start, first.end, role)

    def names(self, role: str = CHANGES) -> list[TableRef]:
        """A comma-separated list of names."""
        found = []
        while True:
            ref = self.name(role)
            if ref is None:
                return found
            found.append(ref)
            tok = self.peek()
            if tok is None or tok.value != ",":
                return found
            self.i += 1


def _qualified_names(toks: list[_Tok]) -> list[TableRef]:
    found = []
    for j in range(len(toks) - 2):
        a, dot, b = toks[j], toks[j + 1], toks[j + 2]
        if (
            a.kind in ("word", "quoted")
            and dot.value == "."
            and b.kind in ("word", "quoted")
            and a.end == dot.start
            and dot.end == b.start
        ):
            found.append(TableRef(a.value, b.value, a.start, b.end, READS))
    return found


def _with_stray(ddl: Ddl, toks: list[_Tok]) -> Ddl:
    placed = {(r.start, r.end) for r in ddl.refs}
    placed |= {(r.start, r.end) for pair in ddl.renames for r in pair}
    ddl.stray = [r for r in _qualified_names(toks) if (r.start, r.end) not in placed]
    return ddl


def _alter_table(reader: _Reader, head: str) -> Ddl:
    reader.accept("IF EXISTS")
    table = reader.name()
    if table is None:
        return Ddl(UNKNOWN, head)
    refs = [table]
    # The rest: REFERENCES parent (a foreign key), RENAME [TO|AS] new, EXCHANGE ... WITH TABLE t.
    while reader.peek() is not None:
        word = reader.word()
        reader.i += 1
        if word == "REFERENCES":
            ref = reader.name(READS)
            if ref is not None:
                refs.append(ref)
        elif word == "RENAME" and reader.word() not in ("COLUMN", "INDEX", "KEY", "CONSTRAINT"):
            reader.accept("TO", "AS")
            ref = reader.name()
            if ref is None:
                return Ddl(UNKNOWN, head)
            return Ddl(RENAME, head, renames=[(table, ref)])
        elif word == "WITH" and reader.word() == "TABLE":
            reader.i += 1
            ref = reader.name()
            if ref is not None:
                refs.append(ref)
    return Ddl(TABLE, head, refs=refs)


def _create_table(reader: _Reader, head: str) -> Ddl:
    reader.accept("IF NOT EXISTS")
    table = reader.name()
    if table is None:
        return Ddl(UNKNOWN, head)
    refs = [table]
    like = False
    depth = 0
    while reader.peek() is not None:
        tok = reader.peek()
        word = reader.word()
        reader.i += 1
        if tok.value == "(":
            depth += 1
        elif tok.value == ")":
            depth -= 1
        elif word == "LIKE" and (depth == 0 or (depth == 1 and len(refs) == 1)):
            ref = reader.name(READS)
            if ref is not None:
                refs.append(ref)
                like = True
        elif word == "REFERENCES":
            ref = reader.name(READS)
            if ref is not None:
                refs.append(ref)
        elif word in ("SELECT", "AS", "WITH") and depth == 0:
            return Ddl(UNKNOWN, head)  # CREATE ... SELECT reads tables the grammar does not follow
    return Ddl(TABLE, head, refs=refs, creates_like=like)


def _index(reader: _Reader, head: str) -> Ddl:
    reader.accept("IF NOT EXISTS", "IF EXISTS")
    if reader.name() is None:  # the index name
        return Ddl(UNKNOWN, head)
    if not reader.accept("ON"):
        return Ddl(UNKNOWN, head)
    table = reader.name()
    return Ddl(TABLE, head, refs=[table]) if table is not None else Ddl(UNKNOWN, head)


def _object(reader: _Reader, head: str, what: str) -> Ddl:
    reader.accept("IF NOT EXISTS", "IF EXISTS")
    name = reader.name()
    if name is None:
        return Ddl(UNKNOWN, head)
    refs = [TableRef(name.database, name.table, name.start, name.end, what)]
    if what == "TRIGGER":
        while reader.peek() is not None and not reader.accept("ON"):
            reader.i += 1
        table = reader.name()
        if table is not None:
            refs.append(table)
    return Ddl(OBJECT, head, refs=refs)


def ddl_analyse(text: str) -> Ddl:
    """The statement's kind and the tables it names (see the module docstring)."""
    toks = _tokens(text)
    reader = _Reader(toks)
    head = reader.word()
    if not head:
        return Ddl(UNKNOWN)
    reader.i += 1
    if head == "CREATE OR REPLACE":
        head = "CREATE"
    if head in ("BEGIN", "COMMIT"):
        return Ddl(TRANSACTION, head)
    if head == "ROLLBACK":
        return Ddl(TRANSACTION, head)
    if head in ("SAVEPOINT", "RELEASE", "XA"):
        return Ddl(TRANSACTION, head)
    if head in _HARMLESS_HEADS:
        return Ddl(HARMLESS, head)
    if head == "SET":  # SET PASSWORD, SET DEFAULT ROLE: accounts; anything else is unknown
        return Ddl(
            HARMLESS if reader.word() in ("PASSWORD", "DEFAULT ROLE", "DEFAULT") else UNKNOWN, head
        )
    if head in _DML_HEADS:
        return _with_stray(Ddl(DML, head), toks)
    if head == "TRUNCATE":
        reader.accept("TABLE")
        table = reader.name()
        return _with_stray(Ddl(TABLE, head, refs=[table]) if table else Ddl(UNKNOWN, head), toks)
    if head == "RENAME":
        what = reader.word()
        if what in _ACCOUNT_OBJECTS:
            return Ddl(HARMLESS, head)
        if not reader.accept("TABLE", "TABLES"):
            return Ddl(UNKNOWN, head)
        pairs = []
        while True:
            old = reader.name()
            if old is None or not reader.accept("TO"):
                return Ddl(UNKNOWN, head)
            new = reader.name()
            if new is None:
                return Ddl(UNKNOWN, head)
            pairs.append((old, new))
            tok = reader.peek()
            if tok is None:
                break
            if tok.value != ",":
                return Ddl(UNKNOWN, head)
            reader.i += 1
        return _with_stray(Ddl(RENAME, head, renames=pairs), toks)
    if head not in ("ALTER", "CREATE", "DROP"):
        return _with_stray(Ddl(UNKNOWN, head), toks)

    reader.skip_object_options()
    temporary = bool(reader.accept("TEMPORARY"))
    reader.accept("ONLINE", "OFFLINE", "IGNORE")
    reader.accept("UNIQUE", "FULLTEXT", "SPATIAL")
    what = reader.word()
    reader.i += 1
    if what in ("DATABASE", "SCHEMA"):
        reader.accept("IF NOT EXISTS", "IF EXISTS")
        name = reader.peek()
        names = [name.value] if name is not None and name.kind in ("word", "quoted") else []
        return Ddl(DATABASE, head, databases=names)
    if what in _ACCOUNT_OBJECTS:
        return Ddl(HARMLESS, head)
    if what in _OBJECTS:
        return _with_stray(_object(reader, head, what), toks)
    if what == "TABLE":
        if temporary:
            return Ddl(TEMPORARY, head)
        if head == "ALTER":
            return _with_stray(_alter_table(reader, head), toks)
        if head == "CREATE":
            return _with_stray(_create_table(reader, head), toks)
        reader.accept("IF EXISTS")
        tables = reader.names()
        if not tables:
            return Ddl(UNKNOWN, head)
        return _with_stray(Ddl(TABLE, head, refs=tables), toks)
    if what == "INDEX" and head in ("CREATE", "DROP"):
        return _with_stray(_index(reader, head), toks)
    return _with_stray(Ddl(UNKNOWN, head), toks)
