"""Issue 12, item 16 (follow-up): a database name containing '->' is refused when the restore
is planned and filed, not after its data has been loaded.

Rolling a shard forward into a renamed (side) database goes through mariadb-binlog's
`--rewrite-db=FROM->TO`, which has no escaping. The apply refuses such names itself
(tests/backups/test_trust_binlog_apply.py); the plan now refuses them first, so no request
is filed that could only fail after loading every table."""

from __future__ import annotations

import pytest

from backups.engine.mysql import quote_ident
from backups.models import RestoreRequest
from backups.services.errors import RestoreError
from backups.services.full_backups import backup_start
from backups.services.restore_plan import restore_plan_build
from backups.services.restore_requests import restore_request_file
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def arrow_cluster(mariadb_servers, unique_name):
    """One shard whose database is called `<name>->eu`, with rows."""
    server = mariadb_servers[0]
    cluster = make_cluster([server], name=f"rw{unique_name}", tables={"t": 30})
    shard = cluster.shards.get()
    arrow = f"{shard.database}->eu"
    server.execute(
        f"DROP DATABASE IF EXISTS {quote_ident(arrow)}",
        f"CREATE DATABASE {quote_ident(arrow)}",
        f"CREATE TABLE {quote_ident(arrow)}.t LIKE {quote_ident(shard.database)}.t",
        f"INSERT INTO {quote_ident(arrow)}.t SELECT * FROM {quote_ident(shard.database)}.t",
    )
    shard.database = arrow
    shard.save(update_fields=["database"])
    yield cluster
    server.execute(f"DROP DATABASE IF EXISTS {quote_ident(arrow)}")


def test_a_point_in_time_side_restore_of_a_database_named_with_an_arrow_is_refused_when_filed(
    arrow_cluster, mariadb_servers, run_jobs
):
    # A lockfree set rolls every shard forward to `at`, even at its own consistent instant.
    full = backup_start(cluster=arrow_cluster, actor=make_user("operator"), consistency="lockfree")
    run_jobs("backups")
    full.refresh_from_db()
    assert full.status == "succeeded", full.error
    at = full.consistent_at

    with pytest.raises(RestoreError) as previewed:  # the wizard's preview
        restore_plan_build(cluster=arrow_cluster, source_set=full, at=at, target_kind="side")
    with pytest.raises(RestoreError) as filed:
        restore_request_file(
            cluster=arrow_cluster,
            requester=make_user("operator"),
            at=at,
            target="side",
            reason="roll forward",
        )
    for refused in (previewed, filed):
        message = str(refused.value)
        assert message.startswith("shard s00: cannot apply binlogs from database ")
        assert "--rewrite-db" in message and "->eu'" in message and "\n" not in message
    assert not RestoreRequest.objects.filter(cluster=arrow_cluster).exists()

    # Nothing to rewrite: a restore of the set as taken, or in place, is still planned.
    plan = restore_plan_build(cluster=arrow_cluster, source_set=full, target_kind="side")
    assert plan["rows"] == 30 and not plan["needs_incrementals"]
    plan = restore_plan_build(cluster=arrow_cluster, source_set=full, at=at, target_kind="inplace")
    assert plan["needs_incrementals"] and plan["tables"][0]["target_database"].endswith("->eu")
