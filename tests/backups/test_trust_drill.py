"""A hostile drill instance (issue 12, items 1 and 2, end to end): a real backup is drilled onto
a fake MySQL server that asks for the password in clear text or for a worker's file. It gets
neither, and the verification says why the drill failed."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from backups.models import BackupPolicy
from backups.services.full_backups import backup_execute, backup_start
from shards.services.topology import instance_create
from tests.factories import make_cluster

pytestmark = pytest.mark.django_db(transaction=True)

DRILL_PASSWORD = "Drill-Secret-pw-5"
MARKER = b"WORKER-FILE-SECRET-91"


@pytest.fixture
def backed_up(mariadb_servers, unique_name, settings):
    settings.BACKUP_CHUNK_ROWS = 200
    cluster = make_cluster(mariadb_servers[:1], name=f"hd{unique_name}", tables={"t_order": 300})
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults={"verify_automatically": False})
    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", enqueue=False)
    )
    assert backup_set.status == "succeeded", backup_set.error
    return backup_set


def _drill_on(backup_set, fake) -> tuple[int, dict]:
    cluster = backup_set.cluster
    cluster.drill_instance = instance_create(
        actor="test", cluster=cluster, name="drill", host=fake.host, port=fake.port,
        user="drill", password=DRILL_PASSWORD,
    )  # fmt: skip
    cluster.save()
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command("verify", str(backup_set.pk), "--drill", "--json", stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, json.loads(out.getvalue())


def test_a_drill_instance_asking_for_a_cleartext_password_gets_none(backed_up, fake_mysql):
    fake = fake_mysql(auth_switch="mysql_clear_password")
    code, result = _drill_on(backed_up, fake)
    # Refused when the drill first asks the server who it is: the run fails, no Q.
    assert code == 1 and result["q"] is None
    assert fake.handshakes, "the drill never reached the fake server"
    assert fake.received_passwords == []
    assert "clear text" in json.dumps(result)


def test_a_drill_instance_asking_for_a_worker_file_gets_none(backed_up, fake_mysql, tmp_path):
    secret = tmp_path / "worker-file.txt"
    secret.write_bytes(MARKER)
    # It says who it is (the drill records that first), then asks for a file on LOAD DATA.
    fake = fake_mysql(
        infile_on="LOAD DATA",
        infile_name=str(secret),
        answers={"server_uuid": [("fake-drill-uuid",)]},
    )
    code, result = _drill_on(backed_up, fake)
    assert code == 1 and result["q"] < 1
    assert fake.received_infile, "the drill never reached LOAD DATA on the fake server"
    assert all(received == b"" for received in fake.received_infile)
    assert "was refused" in json.dumps(result)
