"""A restore aimed at a hostile server (issue 12, item 1, end to end): filing a restore to an
instance whose server asks for the password in clear text hands it nothing, and the person is
told why in one sentence."""

from __future__ import annotations

import pytest

from backups.services.errors import RestoreError
from shards.services.topology import instance_create
from tests.backups.test_restore_rules import file_request, make_backup
from tests.factories import make_cluster

pytestmark = pytest.mark.django_db(transaction=True)

TARGET_PASSWORD = "Target-Secret-pw-3"


@pytest.mark.parametrize("plugin", ["mysql_clear_password", "dialog"])
def test_a_restore_to_a_server_asking_for_a_cleartext_password_gets_none(
    mariadb_servers, unique_name, run_jobs, fake_mysql, plugin
):
    cluster = make_cluster(mariadb_servers[:1], name=f"hr{unique_name}", tables={"t": 20})
    backup_set = make_backup(cluster, run_jobs)
    fake = fake_mysql(auth_switch=plugin)
    instance_create(
        actor="test", cluster=cluster, name="hostile", host=fake.host, port=fake.port,
        user="restorer", password=TARGET_PASSWORD,
    )  # fmt: skip
    with pytest.raises(RestoreError) as refused:
        file_request(cluster, backup_set, target="instance:hostile")
    assert fake.handshakes, "the restore never reached the fake server"
    assert fake.received_passwords == []
    message = str(refused.value)
    assert "hostile" in message and "clear text" in message and "\n" not in message
