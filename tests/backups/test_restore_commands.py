"""`manage.py restore request|approve|reject|run|show`: the scripted contract of DESIGN.md."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from backups.engine.mysql import quote_ident
from backups.models import RestoreRequest
from backups.services.progress import worker_name
from tests.backups.test_restore_rules import make_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)
KEYS = {"id", "state", "target", "requested_by", "approvals", "results", "q", "error"}


def restore(*args) -> dict | str:
    out = StringIO()
    call_command("restore", *args, stdout=out)
    text = out.getvalue().strip()
    return json.loads(text) if "--json" in args else text


def file_args(cluster, user, *selection, target: str = "side") -> list[str]:
    """`restore request` arguments; `selection` names the set (--set N or --at T) and scope."""
    return [
        "request",
        "--cluster",
        cluster.name,
        *selection,
        "--target",
        target,
        "--reason",
        "r",
        "--as",
        user.username,
    ]


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"rc{unique_name}")


def test_request_approve_run_show_with_json(cluster, mariadb_servers, run_jobs):
    backup_set = make_backup(cluster, run_jobs)
    operator, approver = make_user("operator"), make_user("approver")
    filed = restore(
        "request",
        "--cluster",
        cluster.name,
        "--set",
        str(backup_set.pk),
        "--shards",
        "s01",
        "--tables",
        "t_user",
        "--target",
        "side",
        "--reason",
        "audit asked",
        "--as",
        operator.username,
        "--json",
    )
    assert KEYS <= filed.keys()
    assert (filed["state"], filed["target"], filed["requested_by"]) == (
        "pending_approval",
        "side",
        operator.username,
    )
    assert filed["approvals"] == [] and filed["results"] == [] and filed["q"] is None
    request_id = str(filed["id"])

    approved = restore(
        "approve", request_id, "--as", approver.username, "--comment", "fine", "--json"
    )
    assert approved["state"] == "approved"
    assert [(a["by"], a["decision"], a["comment"]) for a in approved["approvals"]] == [
        (approver.username, "approve", "fine")
    ]
    # No worker is listening: `--wait` runs the job in-process after a few seconds.
    ran = restore("run", request_id, "--wait", "--json")
    assert ran["state"] == "succeeded" and ran["q"] == 1.0 and ran["error"] is None
    shard = cluster.shards.select_related("instance").get(name="s01")
    assert ran["results"] == [
        {
            "shard": "s01",
            "database": shard.database,
            "table": "t_user",
            "target_instance": shard.instance.name,
            "target_database": f"{shard.database}__r{request_id}",
            "target_table": "t_user",
            "rows": 10,
            "rows_expected": 10,
            "checksum_ok": True,
            "worker": worker_name(),  # the part ran in this process: no worker listens
        }
    ]
    assert restore("show", request_id, "--json") == ran
    text = restore("show", request_id)
    assert "succeeded" in text and "checksum ok" in text and "Q = 1.0000" in text
    server = server_for(mariadb_servers, shard.instance)
    assert (
        server.execute("SELECT COUNT(*) FROM t_user", database=f"{shard.database}__r{request_id}")[
            0
        ][0]
        == 10
    )
    server.execute(f"DROP DATABASE {quote_ident(shard.database + '__r' + request_id)}")


def test_plain_request_prints_only_the_id(cluster, run_jobs):
    backup_set = make_backup(cluster, run_jobs)
    out = restore(
        *file_args(cluster, make_user("operator"), "--set", str(backup_set.pk), target="inplace")
    )
    request = RestoreRequest.objects.get()
    assert out == str(request.pk)
    assert request.approvals_required == 2


def test_at_without_offset_means_utc_and_picks_the_newest_set_before_it(cluster, run_jobs):
    first = make_backup(cluster, run_jobs)
    second = make_backup(cluster, run_jobs)
    at = second.consistent_at + timedelta(microseconds=0)
    naive = at.replace(tzinfo=None).isoformat()  # no offset: UTC
    filed = restore(*file_args(cluster, make_user("operator"), "--at", naive), "--json")
    request = RestoreRequest.objects.get(pk=filed["id"])
    assert request.source_set_id == second.pk != first.pk
    assert request.at == at
    with pytest.raises(CommandError, match="not an ISO 8601 time"):
        restore(*file_args(cluster, make_user("operator"), "--at", "yesterday"))
    earlier = (first.consistent_at - timedelta(days=1)).isoformat()
    with pytest.raises(CommandError, match="no succeeded full backup"):
        restore(*file_args(cluster, make_user("operator"), "--at", earlier))


def test_errors_are_one_line_with_json_still_printed(cluster, run_jobs):
    backup_set = make_backup(cluster, run_jobs)
    operator = make_user("operator")
    filed = restore(*file_args(cluster, operator, "--set", str(backup_set.pk)), "--json")
    out = StringIO()
    with pytest.raises(CommandError, match="only approved requests can run"):
        call_command("restore", "run", str(filed["id"]), "--json", stdout=out)
    payload = json.loads(out.getvalue())
    assert payload["state"] == "pending_approval" and "only approved" in payload["error"]
    with pytest.raises(CommandError, match="approvers only"):
        restore("approve", str(filed["id"]), "--as", make_user("auditor").username)
    with pytest.raises(CommandError, match="no active user named 'nobody'"):
        restore("approve", str(filed["id"]), "--as", "nobody")
    with pytest.raises(CommandError, match="no restore request 999999"):
        restore("show", "999999")
    with pytest.raises(CommandError, match="operators only"):
        restore(*file_args(cluster, make_user("approver"), "--set", str(backup_set.pk)))


def test_command_line_exit_code_and_stderr(cluster, run_jobs, settings):
    """The real process: exit 1 and a one-line reason on stderr, no traceback."""

    backup_set = make_backup(cluster, run_jobs)
    approver = make_user("approver")
    env = {
        "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
        "SHARDVAULT_DATA_KEY": settings.SHARDVAULT_DATA_KEY,
        "SHARDVAULT_SECRET_KEY": settings.SECRET_KEY,
        "STORAGE_URL": settings.STORAGE_URL,
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "restore",
            "request",
            "--cluster",
            cluster.name,
            "--set",
            str(backup_set.pk),
            "--tables",
            "t_nope",
            "--target",
            "side",
            "--reason",
            "r",
            "--as",
            approver.username,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "operators only" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not RestoreRequest.objects.exists()
