"""Issue 12 (follow-up to items 1-3): a drill binds the server behind its drill instance, the
way an approved restore binds its target. The first drill to the instance's address records the
identity its server reports; a later drill that finds another server there is refused before a
single row is sent; saving the instance's password again (a deliberate replacement) lets the
next drill record the new server (shards/services/identity.py)."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from backups.models import BackupPolicy
from backups.services.full_backups import backup_execute, backup_start
from console.models import AuditEvent
from shards.models import Instance
from shards.services.topology import instance_create, instance_update
from tests.factories import make_cluster

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def backed_up(mariadb_servers, unique_name, settings):
    settings.BACKUP_CHUNK_ROWS = 200
    cluster = make_cluster(mariadb_servers[:1], name=f"di{unique_name}", tables={"t_order": 300})
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults={"verify_automatically": False})
    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", enqueue=False)
    )
    assert backup_set.status == "succeeded", backup_set.error
    return backup_set


def _drill(backup_set) -> tuple[int, dict, str]:
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command("verify", str(backup_set.pk), "--drill", "--json", stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, json.loads(out.getvalue()), err.getvalue()


def _make_drill_instance(cluster, *, host, port, user, password) -> Instance:
    cluster.drill_instance = instance_create(
        actor="test", cluster=cluster, name="drill", host=host, port=port,
        user=user, password=password,
    )  # fmt: skip
    cluster.save()
    return cluster.drill_instance


def test_the_first_drill_records_the_server_and_a_replaced_server_is_refused_until_vouched_for(
    backed_up, mariadb_servers
):
    server = mariadb_servers[1].endpoint
    drill = _make_drill_instance(
        backed_up.cluster,
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
    )
    code, result, _ = _drill(backed_up)
    assert code == 0 and result["q"] == 1.0, result
    drill.refresh_from_db()
    assert drill.identity.startswith("mariadb:") and f":{server.port}:" in drill.identity
    assert drill.identity_address == f"{server.user}@{server.host}:{server.port}"
    recorded = AuditEvent.objects.get(action="instance.identity_recorded")
    assert recorded.details["identity"] == drill.identity

    # Another server now answers at the address (as if the port had been taken over):
    # here, the record says it was a different server than the one that answers.
    real = drill.identity
    Instance.objects.filter(pk=drill.pk).update(identity="mariadb:elsewhere:3306:/data/:99")
    code, result, err = _drill(backed_up)
    assert code == 1 and result["q"] is None
    message = err.strip().splitlines()[-1]
    assert "drill instance drill" in message and "now answers as another server" in message
    assert f"({real})" in message and "save the instance's password again" in message
    assert AuditEvent.objects.filter(action="instance.identity_mismatch").count() == 1

    # The operator vouches for the server by giving its password again: the next drill
    # records it anew and runs.
    instance_update(
        actor="cli", instance=drill, host=server.host, port=server.port, user=server.user,
        password=server.password,
    )  # fmt: skip
    drill.refresh_from_db()
    assert drill.identity == "" and drill.identity_address == ""
    code, result, _ = _drill(backed_up)
    assert code == 0 and result["q"] == 1.0, result
    drill.refresh_from_db()
    assert drill.identity == real


def test_a_drill_refused_for_another_server_sends_it_nothing(backed_up, fake_mysql):
    fake = fake_mysql(answers={"server_uuid": [("uuid-of-the-new-server",)]})
    drill = _make_drill_instance(
        backed_up.cluster, host=fake.host, port=fake.port, user="drill", password="Drill-pw-7"
    )
    Instance.objects.filter(pk=drill.pk).update(
        identity="mysql:uuid-of-the-recorded-server",
        identity_address=f"drill@{fake.host}:{fake.port}",
    )
    code, result, err = _drill(backed_up)
    assert code == 1 and result["q"] is None
    assert "now answers as another server (mysql:uuid-of-the-new-server)" in err
    assert fake.handshakes, "the drill never asked the server who it is"
    statements = [q for q in fake.queries_seen if not q.upper().startswith("SET ")]
    assert statements == ["SELECT @@global.server_uuid"], statements


def test_moving_the_drill_instance_records_the_server_at_its_new_address(
    backed_up, mariadb_servers
):
    first, second = (s.endpoint for s in mariadb_servers[1:3])
    drill = _make_drill_instance(
        backed_up.cluster,
        host=first.host,
        port=first.port,
        user=first.user,
        password=first.password,
    )
    assert _drill(backed_up)[0] == 0
    drill.refresh_from_db()
    before = drill.identity
    # Moving it needs the password again (item 1); the new address gets its own record.
    instance_update(
        actor="cli", instance=drill, host=second.host, port=second.port, user=second.user,
        password=second.password,
    )  # fmt: skip
    assert _drill(backed_up)[0] == 0
    drill.refresh_from_db()
    assert drill.identity != before and f":{second.port}:" in drill.identity
    assert drill.identity_address == f"{second.user}@{second.host}:{second.port}"
