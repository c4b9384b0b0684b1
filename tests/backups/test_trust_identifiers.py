"""Identifiers with `%`, backticks and newlines round-trip through backup and restore on real
MariaDB (issue 12, item 15): chunk queries never pass identifiers through PyMySQL's
`%`-formatting, so `a%%b` is never read as `a%b` and `100%_off` is not a format error."""

from __future__ import annotations

from backups.engine.dump import dump_cluster
from backups.engine.load import create_database_objects, load_table
from backups.engine.mysql import quote_ident, quote_qualified
from backups.engine.types import TableLoadJob
from tests.backups.conftest import drop_database, make_spec, read_manifest

# name -> (primary key type, a marker value only that table holds)
TABLES = {
    "100%_off": ("INT", "hundred"),  # integer ranges
    "a%b": ("VARCHAR(20)", "single"),  # keyset ranges on a string key
    "a%%b": ("VARCHAR(20)", "double"),  # what %-formatting would turn into a%b
    "tick`and\nnewline%s": ("INT", "tick"),
}
ODD_COLUMN = "pct%s `q`\nv"
ROWS = 700  # several chunks at make_spec's chunk_rows=300


def _create(server, database: str) -> None:
    statements = [f"CREATE DATABASE {quote_ident(database)}"]
    for name, (pk_type, marker) in TABLES.items():
        table = quote_qualified(database, name)
        key = "seq" if pk_type == "INT" else "LPAD(seq, 6, '0')"
        statements += [
            f"CREATE TABLE {table} (id {pk_type} PRIMARY KEY, {quote_ident(ODD_COLUMN)} "
            "VARCHAR(40) NOT NULL) ENGINE=InnoDB",
            f"INSERT INTO {table} SELECT {key}, CONCAT('{marker}-', seq) "  # noqa: S608
            f"FROM mysql.seq_1_to_{ROWS}",
        ]
    server.execute(*statements)


def test_percent_backtick_and_newline_identifiers_round_trip(storage, mariadb_servers, unique_name):
    source, target = mariadb_servers[0], mariadb_servers[1]
    database, restored = f"pct_{unique_name}", f"pct_{unique_name}_r"
    _create(source, database)
    try:
        spec = make_spec([("s1", source, database)])
        result = dump_cluster(spec, storage, progress=lambda e: None, should_cancel=lambda: False)
        assert result.ok, result.error
        shard = read_manifest(storage, spec)["shards"][0]
        assert {t["name"] for t in shard["tables"]} == set(TABLES)
        assert all(t["rows"] == ROWS and len(t["chunks"]) > 1 for t in shard["tables"])
        create_database_objects(target.endpoint, restored, shard, tables=None)
        for table in shard["tables"]:
            job = TableLoadJob(
                manifest_table=table,
                target=target.endpoint,
                target_database=restored,
                target_table=table["name"],
            )
            loaded = load_table(job, storage, progress=lambda e: None, should_cancel=lambda: False)
            assert loaded.checksum_ok, loaded.error
            assert loaded.rows == ROWS
        for name, (_pk, marker) in TABLES.items():
            rows = target.execute(
                f"SELECT DISTINCT SUBSTRING_INDEX({quote_ident(ODD_COLUMN)}, '-', 1) "  # noqa: S608
                f"FROM {quote_qualified(restored, name)}"
            )
            assert [r[0] for r in rows] == [marker], name
    finally:
        drop_database(source, database)
        drop_database(target, restored)
