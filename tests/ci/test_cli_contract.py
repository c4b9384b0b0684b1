"""The command-line contract of DESIGN.md ("Command line"), end to end on real MariaDB.

Every command named there for policies, retention, holds, storage targets, keys, the binlog
browser, methods and stop points: the flags parse as written, `--json` prints ONE object with
every documented key (also when the command fails after it started), a user error is one line
on stderr with a non-zero exit and no traceback, and the exit codes DESIGN names hold.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.factories import make_cluster, make_user

BACKUP_KEYS = {
    "id",
    "cluster",
    "kind",
    "consistency",
    "method",
    "status",
    "rows",
    "raw_bytes",
    "stored_bytes",
    "lock_window_ms",
    "error",
}
SHOW_KEYS = BACKUP_KEYS | {"parent", "triggered_by", "consistent_at", "hold", "copies", "shards"}
SHARD_KEYS = {
    "name",
    "instance",
    "database",
    "status",
    "rows",
    "worker",
    "binlog_file",
    "binlog_pos",
    "gtid",
}
POLICY_KEYS = {
    "cluster",
    "full_cron",
    "full_consistency",
    "incremental_every_minutes",
    "keep_full",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_days",
    "copy_to",
    "full_method",
    "exclude_tables",
    "max_threads_running",
    "encrypt",
    "compression_level",
    "rpo_target_minutes",
    "drill_every_days",
    "webhook_url",
}
VERIFY_KEYS = {"set", "q", "t", "d", "a", "drill", "problems"}
RESTORE_KEYS = {"id", "state", "target", "requested_by", "approvals", "results", "q", "error"}


def run(*args):
    """(exit code, stdout, stderr) of one in-process `manage.py` command."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command(*args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except CommandError as exc:  # printed as one line by manage.py
        code = exc.returncode or 1
        err.write(str(exc))
    return code, out.getvalue(), err.getvalue()


def one_object(out: str) -> dict:
    """stdout holds exactly one JSON object."""
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers, name=f"cli{unique_name}", tables={"t_order": 40})


@pytest.mark.django_db(transaction=True)
def test_storage_topology_policy_block_and_policy_set_follow_the_contract(
    mariadb_servers, unique_name, tmp_path, monkeypatch
):
    admin = make_user("admin")
    operator = make_user("operator")

    code, out, err = run(
        "storage", "add", "offsite", f"file://{tmp_path / 'offsite'}", "--as", admin.username,
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert {"name", "url", "default"} <= set(one_object(out))
    code, out, err = run("storage", "list", "--json")
    assert code == 0, err
    targets = one_object(out)["targets"]
    assert all({"name", "url", "default"} <= set(t) for t in targets)
    assert {t["name"]: t["default"] for t in targets} == {"default": True, "offsite": False}

    # DESIGN's topology example, policy block included, against a real server.
    server = mariadb_servers[0].endpoint
    monkeypatch.setenv("SHARD_A_PW", server.password)
    name = f"orders{unique_name}"
    topology = tmp_path / "topology.yaml"
    topology.write_text(
        f"""clusters:
  - name: {name}
    shard_key: user_id
    instances:
      - {{name: a, host: {server.host}, port: {server.port}, user: {server.user},
         password_env: SHARD_A_PW}}
    shards:
      - {{name: s00, instance: a, database: {name}_00}}
      - {{name: s01, instance: a, database: {name}_01}}
    logical_tables:
      - {{name: t_order, pattern: "t_order_[0-9]+"}}
    policy:
      full_cron: "0 2 * * *"
      incremental_every_minutes: 5
      keep_daily: 14
      copy_to: [offsite]
"""
    )
    code, out, err = run("topology", "import", str(topology))
    assert code == 0, err
    # Its databases do not exist: discovery says so as error findings, and exits 1.
    code, out, err = run("topology", "discover", name, "--json")
    assert code == 1 and "preflight error" in one_line(err)
    found = one_object(out)
    assert {"cluster", "shards", "findings"} <= set(found)
    assert [s["name"] for s in found["shards"]] == ["s00", "s01"]
    assert all({"name", "instance", "database", "tables"} <= set(s) for s in found["shards"])
    assert all(
        {"severity", "instance", "shard", "table", "message"} <= set(f) for f in found["findings"]
    )
    assert "error" in {f["severity"] for f in found["findings"]}

    code, out, err = run("policy", "show", name, "--json")
    assert code == 0, err
    policy = one_object(out)
    assert set(policy) >= POLICY_KEYS
    assert policy["full_cron"] == "0 2 * * *"
    assert policy["incremental_every_minutes"] == 5 and policy["keep_daily"] == 14
    assert policy["copy_to"] == ["offsite"]
    assert policy["keep_full"] == 7 and policy["full_consistency"] == "locked"

    code, exported, err = run("topology", "export", "--cluster", name)
    assert code == 0, err
    assert "copy_to" in exported and "offsite" in exported and "0 2 * * *" in exported
    again = tmp_path / "again.yaml"
    again.write_text(exported)
    code, out, err = run("topology", "import", str(again))  # idempotent
    assert code == 0, err
    code, out, err = run("policy", "show", name, "--json")
    assert one_object(out) == policy

    # Every flag of `policy set`, as DESIGN spells it.
    code, out, err = run(
        "policy", "set", name,
        "--full-cron", "30 3 * * 1", "--full-consistency", "lockfree",
        "--full-method", "logical", "--exclude-tables", f"{name}_00.t_tmp*,*.audit",
        "--max-threads-running", "40", "--incremental-every", "15",
        "--keep-full", "3", "--keep-daily", "10", "--keep-weekly", "5",
        "--keep-monthly", "2", "--keep-days", "4", "--copy-to", "offsite",
        "--encrypt", "on", "--rpo-minutes", "60", "--drill-every-days", "7",
        "--webhook", "http://127.0.0.1:9/hook", "--as", admin.username, "--json",
    )  # fmt: skip
    assert code == 0, err
    changed = one_object(out)
    assert set(changed) >= POLICY_KEYS
    assert {
        k: changed[k]
        for k in (
            "full_cron", "full_consistency", "full_method", "exclude_tables",
            "max_threads_running", "incremental_every_minutes", "keep_full", "keep_daily",
            "keep_weekly", "keep_monthly", "keep_days", "copy_to", "encrypt",
            "rpo_target_minutes", "drill_every_days", "webhook_url",
        )
    } == {
        "full_cron": "30 3 * * 1", "full_consistency": "lockfree", "full_method": "logical",
        "exclude_tables": [f"{name}_00.t_tmp*", "*.audit"], "max_threads_running": 40,
        "incremental_every_minutes": 15, "keep_full": 3, "keep_daily": 10, "keep_weekly": 5,
        "keep_monthly": 2, "keep_days": 4, "copy_to": ["offsite"], "encrypt": True,
        "rpo_target_minutes": 60, "drill_every_days": 7,
        "webhook_url": "http://127.0.0.1:9/hook",
    }  # fmt: skip
    code, out, err = run(
        "policy", "set", name, "--full-cron", "none", "--exclude-tables", "none",
        "--copy-to", "none", "--webhook", "none", "--as", admin.username, "--json",
    )  # fmt: skip
    assert code == 0, err
    cleared = one_object(out)
    assert (cleared["full_cron"], cleared["exclude_tables"]) == ("", [])
    assert (cleared["copy_to"], cleared["webhook_url"]) == ([], "")

    # Refusals: one line, non-zero, and with --json still one object; nothing saved.
    for argv, fragment in (
        (("--keep-full", "3", "--as", operator.username), "admin"),
        (("--copy-to", "nowhere", "--as", admin.username), "nowhere"),
        (("--full-cron", "every day", "--as", admin.username), "full_cron"),
        (("--keep-daily", "-1", "--as", admin.username), "keep_daily"),
    ):
        code, out, err = run("policy", "set", name, *argv, "--json")
        assert code != 0
        assert fragment in one_line(err)
        assert one_object(out)["error"]
    code, out, err = run("policy", "show", name, "--json")
    assert one_object(out) == cleared
    code, out, err = run("policy", "show", "no-such-cluster", "--json")
    assert code != 0 and "no-such-cluster" in one_line(err)
    assert one_object(out)["cluster"] == "no-such-cluster"


@pytest.mark.django_db(transaction=True)
def test_backup_methods_show_hold_verify_retention_sweep_keys_and_binlog(cluster, client, settings):
    admin = make_user("admin")
    operator = make_user("operator")

    # Cold is a logical method (the lock held for the whole dump): cold + physical is refused
    # in one line, with the JSON object still printed.
    code, out, err = run(
        "backup", cluster.name, "--consistency", "cold", "--method", "physical", "--json"
    )  # fmt: skip
    assert code == 1
    assert "cold" in one_line(err)
    assert one_object(out)["error"]

    code, out, err = run(
        "backup", cluster.name, "--consistency", "cold", "--wait", "--json",
        "--as", operator.username,
    )  # fmt: skip
    assert code == 0, err
    cold = one_object(out)
    assert BACKUP_KEYS <= set(cold)
    assert (cold["status"], cold["consistency"], cold["method"]) == ("succeeded", "cold", "logical")

    code, out, err = run(
        "backup", cluster.name, "--consistency", "lockfree", "--method", "logical", "--wait",
        "--json", "--as", operator.username,
    )  # fmt: skip
    assert code == 0, err
    done = one_object(out)
    assert BACKUP_KEYS <= set(done)
    assert (done["status"], done["consistency"], done["method"]) == (
        "succeeded",
        "lockfree",
        "logical",
    )
    set_id = str(done["id"])

    code, out, err = run("topology", "discover", cluster.name, "--json")
    assert code == 0, err
    tables = [t for s in one_object(out)["shards"] for t in s["tables"]]
    assert tables and all({"name", "engine", "rows", "has_primary_key"} <= set(t) for t in tables)

    code, out, err = run("backups", "list", "--cluster", cluster.name, "--json")
    assert code == 0, err
    sets = one_object(out)["sets"]
    assert all(BACKUP_KEYS <= set(s) for s in sets) and len(sets) == 2

    code, out, err = run("backups", "show", set_id, "--json")
    assert code == 0, err
    shown = one_object(out)
    assert SHOW_KEYS <= set(shown)
    assert shown["triggered_by"] == operator.username and shown["hold"] is None
    assert shown["shards"] and all(SHARD_KEYS <= set(s) for s in shown["shards"])
    assert all({"target", "state"} <= set(c) for c in shown["copies"])

    code, out, err = run("backups", "hold", set_id, "--as", operator.username, "--reason",
                         "audit", "--json")  # fmt: skip
    assert code == 0, err
    assert SHOW_KEYS <= set(one_object(out)) and one_object(out)["hold"]["reason"] == "audit"
    code, out, err = run("backups", "release", set_id, "--as", operator.username, "--json")
    assert code != 0 and one_line(err) and "error" in one_object(out)
    code, out, err = run("backups", "release", set_id, "--as", admin.username, "--json")
    assert code == 0, err
    assert one_object(out)["hold"] is None
    code, out, err = run("backups", "show", "999999", "--json")
    assert code != 0 and "999999" in one_line(err) and one_object(out)["error"]

    code, out, err = run("verify", set_id, "--json")
    assert code == 0, err
    verified = one_object(out)
    assert VERIFY_KEYS <= set(verified)
    assert verified["q"] == 1.0 and verified["drill"] is False
    code, out, err = run("verify", set_id, "--target", "nowhere", "--json")
    assert code != 0 and "nowhere" in one_line(err)
    assert VERIFY_KEYS <= set(one_object(out))
    code, out, err = run("verify", "999999", "--json")
    assert code != 0 and one_line(err) and one_object(out)["error"]

    # GET /metrics: DESIGN's series and labels, behind the bearer token.
    settings.SHARDVAULT_METRICS_TOKEN = "contract-token"
    assert client.get("/metrics").status_code == 401
    scrape = client.get("/metrics", HTTP_AUTHORIZATION="Bearer contract-token")
    assert scrape.status_code == 200
    text = scrape.content.decode()
    c = cluster.name
    for series in (
        f'shardvault_last_success_timestamp_seconds{{cluster="{c}",kind="full"}}',
        f'shardvault_rpo_age_seconds{{cluster="{c}"}}',
        f'shardvault_quality{{cluster="{c}"}} 1.0',
        f'shardvault_backups_total{{cluster="{c}",kind="full",status="succeeded"}} 2.0',
        f'shardvault_backup_duration_seconds{{cluster="{c}",kind="full"}}',
        'shardvault_queue_jobs{queue="backups"}',
    ):
        assert series in text, series
    settings.SHARDVAULT_METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer contract-token").status_code == 404

    code, out, err = run("retention", "apply", cluster.name, "--dry-run", "--json")
    assert code == 0, err
    decision = one_object(out)
    assert {"cluster", "dry_run", "removed", "kept"} <= set(decision)
    assert decision["dry_run"] is True and decision["cluster"] == cluster.name
    assert all({"set", "reason"} <= set(d) for d in decision["removed"] + decision["kept"])
    assert int(set_id) in [d["set"] for d in decision["kept"]]
    code, out, err = run("retention", "apply", "no-such-cluster", "--json")
    assert code != 0 and one_line(err)
    assert {"cluster", "dry_run", "removed", "kept"} <= set(one_object(out))

    orphan = Path(settings.STORAGE_URL.removeprefix("file://")) / cluster.name / "999999"
    orphan.mkdir(parents=True)
    (orphan / "left-behind.bin").write_bytes(b"x" * 10)
    sweep = ("storage", "sweep", "--cluster", cluster.name, "--grace-hours", "0")
    code, out, err = run(*sweep, "--target", "default", "--dry-run", "--json")
    assert code == 0, err
    swept = one_object(out)
    assert {"dry_run", "orphans", "deleted"} <= set(swept)
    assert swept["dry_run"] is True and swept["deleted"] == 0
    assert [(o["target"], o["key"]) for o in swept["orphans"]] == [
        ("default", f"{cluster.name}/999999/left-behind.bin")
    ]
    assert all(isinstance(o["age_hours"], float | int) for o in swept["orphans"])
    code, out, err = run(*sweep, "--json")
    assert code == 0, err
    assert one_object(out)["deleted"] == 1 and not (orphan / "left-behind.bin").exists()
    code, out, err = run("verify", set_id, "--json")  # the set's own objects were kept
    assert code == 0 and one_object(out)["q"] == 1.0
    code, out, err = run("storage", "sweep", "--cluster", "no-such-cluster", "--json")
    assert code != 0 and one_line(err)
    assert {"dry_run", "orphans", "deleted"} <= set(one_object(out))

    for action in ("status", "rotate"):
        code, out, err = run("keys", action, "--json")
        assert code == 0, err
        keys = one_object(out)
        assert {"current", "keys"} <= set(keys)
        assert all({"id", "sets", "passwords", "manifests"} <= set(k) for k in keys["keys"])

    code, out, err = run("binlog", "events", cluster.name, "--since", "2026-01-01T00:00:00",
                         "--until", "2026-01-02T00:00:00Z", "--shards", "s00",
                         "--tables", "t_order", "--json")  # fmt: skip
    assert code == 0, err
    assert one_object(out) == {"cluster": cluster.name, "transactions": []}
    code, out, err = run("binlog", "events", cluster.name, "--since", "yesterday", "--json")
    assert code != 0 and "--since" in one_line(err)
    assert one_object(out)["transactions"] == []


@pytest.mark.django_db(transaction=True)
def test_restore_stop_point_and_flashback_flags_parse_and_refuse_in_one_line(cluster):
    operator = make_user("operator")
    common = ("--cluster", cluster.name, "--reason", "contract", "--as", operator.username)
    for argv in (
        ("--before-gtid", "0-1-999999", "--target", "side"),
        ("--until", "m0:mysql-bin.000001:4", "--until", "m1:nope", "--target", "side"),
        ("--flashback",),
        ("--flashback", "--since", "2026-01-01T00:00:00", "--until", "2026-01-01T01:00:00"),
    ):
        code, out, err = run("restore", "request", *common, *argv, "--json")
        assert code != 0
        one_line(err)
        assert RESTORE_KEYS <= set(one_object(out))
        assert one_object(out)["error"]

    window = ("--flashback", "--since", "2026-01-01T00:00:00", "--until", "an hour later")
    code, out, err = run("restore", "request", *common, *window, "--json")
    assert code != 0 and one_line(err).startswith("--until 'an hour later'")
    assert one_object(out)["id"] is None
    code, out, err = run("restore", "request", *common, "--set", "1", "--json")
    assert code != 0 and "--target" in one_line(err)


@pytest.mark.django_db(transaction=True)
def test_user_errors_from_the_real_manage_py_are_one_line_without_traceback(tmp_path):
    from django.db import connection

    env = {
        "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
        "PATH": "/usr/bin:/bin",
        "STORAGE_URL": f"file://{tmp_path}",
    }
    for argv, fragment in (
        (["backup", "nosuch", "--method", "physical", "--json"], "nosuch"),
        (["verify", "424242", "--json"], "424242"),
        (["policy", "show", "nosuch", "--json"], "nosuch"),
        (["retention", "apply", "nosuch", "--dry-run", "--json"], "nosuch"),
        (["storage", "sweep", "--cluster", "nosuch", "--json"], "nosuch"),
        (["binlog", "events", "nosuch", "--json"], "nosuch"),
    ):
        done = subprocess.run(
            [sys.executable, "manage.py", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode != 0, argv
        assert fragment in one_line(done.stderr), argv
        assert one_object(done.stdout)["error"], argv

    # A flag argparse refuses: its one error line, not the whole usage block.
    for argv, fragment in (
        (["backup", "c", "--consistency", "bogus"], "--consistency"),
        (["backup", "c", "--method", "rsync"], "--method"),
        (["policy", "set", "c", "--keep-full", "3"], "--as"),
        (["storage", "sweep", "--grace-hours", "soon"], "--grace-hours"),
        (["restore", "request", "--cluster", "c", "--target", "side"], "--reason"),
        (["topology", "discover"], "cluster"),
    ):
        done = subprocess.run(
            [sys.executable, "manage.py", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 2, argv
        assert fragment in one_line(done.stderr), argv


@pytest.mark.django_db(transaction=True)
def test_copy_to_offsite_shows_in_backups_show_and_verify_target_reads_it_alone(
    cluster, run_jobs, tmp_path
):
    admin = make_user("admin")
    code, out, err = run(
        "storage", "add", "offsite", f"file://{tmp_path / 'offsite'}", "--as", admin.username
    )
    assert code == 0, err
    code, out, err = run(
        "policy", "set", cluster.name, "--copy-to", "offsite", "--as", admin.username
    )
    assert code == 0, err
    code, out, err = run("backup", cluster.name, "--wait", "--json")
    assert code == 0, err
    set_id = str(one_object(out)["id"])
    run_jobs("backups")

    code, out, err = run("backups", "show", set_id, "--json")
    assert code == 0, err
    copies = [(c["target"], c["state"]) for c in one_object(out)["copies"]]
    assert copies == [("offsite", "complete")]
    code, out, err = run("verify", set_id, "--target", "offsite", "--json")
    assert code == 0, err
    checked = one_object(out)
    assert VERIFY_KEYS <= set(checked) and checked["q"] == 1.0

    # A flipped byte in the offsite copy: verify --target offsite says Q < 1 and exits 1.
    objects = sorted(p for p in (tmp_path / "offsite").rglob("*") if p.is_file())
    chunk = next(p for p in objects if "manifest" not in p.name)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, out, err = run("verify", set_id, "--target", "offsite", "--json")
    assert code == 1 and "< 1" in one_line(err)
    broken = one_object(out)
    assert broken["q"] < 1.0 and broken["problems"]
    assert all(("object" in p or "table" in p) and "reason" in p for p in broken["problems"])
    code, out, err = run("verify", set_id, "--json")  # the default target is intact
    assert code == 0 and one_object(out)["q"] == 1.0
