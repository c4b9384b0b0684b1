"""`manage.py backup` and `manage.py backups list`: the command-line contract of DESIGN.md."""

import io
import json

import pytest
from django.core.management import CommandError, call_command

from backups.models import BackupSet
from tests.factories import make_cluster, make_user

JSON_KEYS = {
    "id",
    "cluster",
    "kind",
    "consistency",
    "status",
    "rows",
    "raw_bytes",
    "stored_bytes",
    "lock_window_ms",
    "error",
}


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command(*args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code or 0
    except CommandError as exc:  # argparse errors when called in-process
        code, err = 2, io.StringIO(str(exc))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(
        mariadb_servers, name=f"cmd{unique_name}", tables={"t_order": 300, "t_user": 50}
    )


@pytest.mark.django_db(transaction=True)
def test_backup_wait_json_runs_without_a_worker_and_prints_the_contract_keys(cluster):
    code, out, err = run("backup", cluster.name, "--wait", "--json", "--consistency", "locked")
    assert code == 0, err
    result = json.loads(out)
    assert JSON_KEYS <= set(result)
    assert result["cluster"] == cluster.name
    assert result["kind"] == "full" and result["consistency"] == "locked"
    assert result["status"] == "succeeded", result["error"]
    assert result["rows"] == 3 * (300 + 50)
    assert result["stored_bytes"] > 0 and result["raw_bytes"] > 0
    assert result["lock_window_ms"] is not None
    assert result["error"] == ""

    code, out, err = run("backups", "list", "--cluster", cluster.name, "--json")
    assert code == 0, err
    listed = json.loads(out)["sets"]
    assert [s["id"] for s in listed] == [result["id"]]
    assert JSON_KEYS <= set(listed[0])
    assert listed[0]["status"] == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_backup_prints_the_set_id_and_a_second_one_is_refused_but_recorded(cluster):
    code, out, err = run("backup", cluster.name)
    assert code == 0, err
    first = int(out.strip())
    assert BackupSet.objects.get(pk=first).status == "pending"

    code, out, err = run("backup", cluster.name, "--json")
    assert code == 1
    refused = json.loads(out)
    assert refused["status"] == "failed"
    assert "already being backed up" in refused["error"]
    assert len(err.strip().splitlines()) == 1 and "already being backed up" in err
    assert BackupSet.objects.get(pk=refused["id"]).status == "failed"


@pytest.mark.django_db
def test_backup_errors_are_one_line_and_nothing_is_recorded(cluster):
    code, out, err = run("backup", "no-such-cluster")
    assert code == 1 and err.strip() == "no cluster named 'no-such-cluster'"

    auditor = make_user("auditor")
    code, out, err = run("backup", cluster.name, "--as", auditor.username)
    assert code == 1 and "may not run backups" in err
    assert len(err.strip().splitlines()) == 1

    code, out, err = run("backup", cluster.name, "--consistency", "sloppy")
    assert code != 0
    assert not BackupSet.objects.filter(cluster=cluster).exists()

    code, out, err = run("backups", "list", "--cluster", "nope", "--json")
    assert code == 1 and "no cluster named 'nope'" in err


@pytest.mark.django_db(transaction=True)
def test_encrypted_lockfree_backup_as_an_operator(mariadb_servers, unique_name):
    cluster = make_cluster(mariadb_servers[:2], name=f"enc{unique_name}", tables={"t": 25})
    operator = make_user("operator")
    code, out, err = run(
        "backup",
        cluster.name,
        "--consistency",
        "lockfree",
        "--encrypt",
        "--wait",
        "--json",
        "--as",
        operator.username,
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "succeeded" and result["consistency"] == "lockfree"
    assert result["rows"] == 50 and result["encrypted"] is True
    backup_set = BackupSet.objects.get(pk=result["id"])
    assert backup_set.triggered_by == operator and backup_set.key_id


@pytest.mark.django_db(transaction=True)
def test_incremental_wait_without_a_worker_also_finishes(mariadb_servers, unique_name):
    cluster = make_cluster(mariadb_servers[:2], name=f"inc{unique_name}", tables={"t": 10})
    code, out, err = run("backup", cluster.name, "--wait", "--json")
    assert code == 0, err
    full = json.loads(out)
    database = cluster.shards.get(name="s00").database
    mariadb_servers[0].execute(
        "INSERT INTO t (id, shard, amount, created_at) VALUES (11, 's00', 1, NOW())",
        database=database,
    )
    code, out, err = run("backup", cluster.name, "--kind", "incremental", "--wait", "--json")
    assert code == 0, err
    incremental = json.loads(out)
    assert JSON_KEYS <= set(incremental)
    assert incremental["kind"] == "incremental" and incremental["status"] == "succeeded"
    assert BackupSet.objects.get(pk=incremental["id"]).parent_id == full["id"]


@pytest.mark.django_db(transaction=True)
def test_an_encrypted_backup_with_a_bad_master_key_is_one_line_and_nothing_is_recorded(
    cluster, settings
):
    settings.SHARDVAULT_DATA_KEY = "not-a-master-key"
    code, out, err = run("backup", cluster.name, "--encrypt")
    assert code == 1 and "SHARDVAULT_DATA_KEY" in err
    assert len(err.strip().splitlines()) == 1
    assert not BackupSet.objects.filter(cluster=cluster).exists()


@pytest.mark.django_db(transaction=True)
def test_a_backup_to_a_misconfigured_storage_url_fails_with_one_line(cluster, settings):
    settings.STORAGE_URL = "file://relative/backups"
    code, out, err = run("backup", cluster.name, "--wait")
    assert code == 1 and "must be file:///absolute/path" in err
    assert len(err.strip().splitlines()) == 1
    backup_set = BackupSet.objects.get(cluster=cluster)
    assert backup_set.status == "failed" and "must be file:///absolute/path" in backup_set.error
