"""Restored views, routines, triggers and events keep their DEFINER and restored events never
fire (issue 12, item 10), on real MariaDB."""

from __future__ import annotations

import pytest

from backups.engine.load import recreate_database_objects
from backups.engine.mysql import quote_ident
from backups.engine.schema import database_objects, event_disabled
from tests.backups.conftest import drop_database

OWNER = "'app_owner'@'%'"


@pytest.fixture
def source_with_objects(mariadb_servers, unique_name):
    source, target = mariadb_servers[0], mariadb_servers[1]
    database = f"obj_{unique_name}"
    for server in (source, target):
        server.execute(f"CREATE USER IF NOT EXISTS {OWNER}")
    db = quote_ident(database)
    source.execute(
        f"CREATE DATABASE {db}",
        f"CREATE TABLE {db}.t (id INT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(20))",
        f"CREATE DEFINER={OWNER} SQL SECURITY DEFINER VIEW {db}.v AS SELECT id FROM {db}.t",
        f"CREATE DEFINER={OWNER} PROCEDURE {db}.p() SELECT 1",
        f"CREATE DEFINER={OWNER} TRIGGER {db}.tr BEFORE INSERT ON {db}.t "
        "FOR EACH ROW SET NEW.note = 'trg'",
        f"CREATE DEFINER={OWNER} EVENT {db}.`ev ENABLE` ON SCHEDULE EVERY 1 MINUTE "
        "ON COMPLETION PRESERVE ENABLE COMMENT 'ENABLE DO' "
        f"DO INSERT INTO {db}.t (note) VALUES ('ENABLE')",
    )
    conn = source.connect(database)
    try:
        objects = database_objects(conn, database)
    finally:
        conn.close()
    yield source, target, database, {"name": "s1", "database": database, **objects}
    drop_database(source, database)
    for server in (source, target):
        server.execute(f"DROP USER IF EXISTS {OWNER}")


def test_restored_objects_keep_their_definer_and_events_are_created_disabled(
    source_with_objects, unique_name
):
    _source, target, database, shard = source_with_objects
    restored = f"{database}__r1"
    db = quote_ident(restored)
    target.execute(
        f"CREATE DATABASE {db}",
        f"CREATE TABLE {db}.t (id INT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(20))",
    )
    try:
        created = recreate_database_objects(target.endpoint, restored, shard)
        assert set(created) == {"v", "p", "tr", "ev ENABLE"}
        name = f"'{restored}'"
        definers = target.execute(
            f"SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = {name} UNION ALL "
            f"SELECT DEFINER FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {name} UNION ALL "
            f"SELECT DEFINER FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = {name} UNION ALL "
            f"SELECT DEFINER FROM information_schema.EVENTS WHERE EVENT_SCHEMA = {name}"
        )
        assert [d for (d,) in definers] == ["app_owner@%"] * 4
        status, comment, body = target.execute(
            "SELECT STATUS, EVENT_COMMENT, EVENT_DEFINITION FROM information_schema.EVENTS "
            f"WHERE EVENT_SCHEMA = '{restored}'"
        )[0]
        assert status == "DISABLED"
        assert comment == "ENABLE DO" and "VALUES ('ENABLE')" in body
    finally:
        drop_database(target, restored)


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE DEFINER=`root`@`localhost` EVENT `e` ON SCHEDULE EVERY 1 HOUR STARTS "
        "'2026-01-01 00:00:00' ON COMPLETION NOT PRESERVE ENABLE DO SELECT 'ENABLE'",
        "CREATE DEFINER=`a``b`@`%` EVENT `x ON COMPLETION PRESERVE ENABLE` ON SCHEDULE AT "
        "'2026-01-01 00:00:00' ON COMPLETION PRESERVE DISABLE ON SLAVE COMMENT 'c' DO SELECT 1",
    ],
)
def test_event_status_is_rewritten_only_in_the_header(ddl):
    disabled = event_disabled(ddl)
    assert disabled.count("DISABLE") == 1 + ddl.count("DISABLE") - ddl.count("DISABLE ON SLAVE")
    assert " PRESERVE DISABLE " in disabled and disabled.endswith(ddl.split(" DO ", 1)[1])
