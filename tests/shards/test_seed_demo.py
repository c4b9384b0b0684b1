"""`make run`'s demo: seeded twice safely, and backed up and verified end to end."""

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from backups.models import BackupSet
from backups.services.full_backups import backup_execute, backup_start
from backups.services.verification import verification_run_now
from shards.models import Cluster, Finding


@pytest.mark.django_db(transaction=True)
def test_demo_cluster_seeds_idempotently_and_backs_up_with_every_checksum(mariadb_servers):
    server = mariadb_servers[2]
    args = ["--host", "127.0.0.1", "--port", str(server.port), "--user", "root", "--force"]
    call_command("seed_demo", *args, stdout=StringIO())
    second = StringIO()
    call_command("seed_demo", *args, stdout=second)
    assert "no changes" in second.getvalue()

    cluster = Cluster.objects.get(name="demo")
    assert cluster.shards.count() == 4
    # Preflight has something to say, but nothing that stops a backup.
    assert Finding.objects.filter(cluster=cluster, table="t_legacy_log").exists()
    assert not Finding.objects.filter(cluster=cluster, severity="error").exists()

    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", enqueue=False)
    )
    assert backup_set.status == BackupSet.Status.SUCCEEDED, backup_set.error
    assert backup_set.rows > 0
    verification = verification_run_now(backup_set=backup_set, drill=True)
    assert verification.q == 1.0, verification.problems


@pytest.mark.django_db
def test_a_user_who_may_not_create_the_demo_databases_gets_one_sentence(
    mariadb_servers, unique_name
):
    server = mariadb_servers[2]
    user = f"np{unique_name}"[:32]
    server.execute(f"CREATE USER '{user}'@'%'")
    try:
        args = ["--host", "127.0.0.1", "--port", str(server.port), "--user", user, "--force"]
        with pytest.raises(CommandError) as failure:
            call_command("seed_demo", *args, stdout=StringIO())
        message = str(failure.value)
        assert message.startswith("cannot seed the demo: ") and "\n" not in message
        assert user in message
    finally:
        server.execute(f"DROP USER '{user}'@'%'")
