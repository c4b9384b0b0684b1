"""Verification: storage check (A), restore drills (T, D, RTO), quality on pages and alerts.

Real MariaDB servers, real local storage, a real backup made by the backup service.
"""

from __future__ import annotations

import http.server
import json
import threading
from datetime import timedelta
from io import StringIO
from pathlib import Path

import django_rq
import pytest
from django.core import mail
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from backups import queue
from backups.engine import verify as engine
from backups.models import BackupPolicy, BackupSet, Chunk, VerificationRun
from backups.selectors.verification import set_quality, sets_flagged_unverified_drill
from backups.services.alerts import alert_backup_failed, alerts_check_rpo
from backups.services.errors import VerificationError
from backups.services.full_backups import backup_execute, backup_start
from backups.services.housekeeping import housekeeping_checks, housekeeping_reap
from backups.services.sets import set_data_key, set_prefix, set_storage
from backups.services.verification import (
    verification_drills_schedule,
    verification_run_now,
    verification_start,
)
from console.keys import manifest_hmac_key
from console.models import AuditEvent
from console.roles import RoleDenied
from shards.models import Cluster, Instance
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(
        mariadb_servers[:2], name=f"v{unique_name}", tables={"t_order": 700, "t_user": 40}
    )


@pytest.fixture
def backed_up(cluster, settings):
    settings.SHARDVAULT_CHUNK_ROWS = 200
    settings.BACKUP_CHUNK_ROWS = 200
    # These tests file their own verifications; the automatic one has a test of its own.
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults={"verify_automatically": False})
    backup_set = backup_start(cluster=cluster, actor="cli", enqueue=False)
    backup_set = backup_execute(backup_set=backup_set)
    assert backup_set.status == "succeeded", backup_set.error
    return backup_set


def _storage_root(settings):
    return Path(settings.STORAGE_URL.removeprefix("file://"))


def _chunk_keys(backup_set):
    return list(
        Chunk.objects.filter(table_backup__shard_backup__backup_set=backup_set)
        .order_by("table_backup__shard_backup__shard_name", "table_backup__name", "index")
        .values_list("key", flat=True)
    )


def _verify_cli(set_id, *args):
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command("verify", str(set_id), "--json", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, json.loads(out.getvalue()), err.getvalue()


def _scratch_databases(servers, verification_id):
    names = []
    for server in servers:
        rows = server.execute(f"SHOW DATABASES LIKE '\\_\\_svdrill\\_{verification_id}\\_%'")
        names.extend(r[0] for r in rows)
    return names


def test_storage_check_of_a_good_set_gives_q_1(backed_up):
    code, result, _ = _verify_cli(backed_up.pk)
    assert code == 0
    assert result["set"] == backed_up.pk and result["drill"] is False
    assert (result["q"], result["t"], result["d"], result["a"]) == (1.0, 1.0, 1.0, 1.0)
    assert result["problems"] == []
    backed_up.refresh_from_db()
    assert backed_up.q == 1.0 and backed_up.verified_at is not None
    run = VerificationRun.objects.get(backup_set=backed_up)
    actions = list(
        AuditEvent.objects.filter(
            object_type="backups.verificationrun", object_id=str(run.pk)
        ).values_list("action", flat=True)
    )
    assert actions == ["verification.request", "verification.start", "verification.finish"]


def test_corrupt_object_drops_a_and_q_names_the_object_and_is_flagged(backed_up, settings, client):
    key = _chunk_keys(backed_up)[1]
    path = _storage_root(settings) / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    code, result, err = _verify_cli(backed_up.pk)
    assert code == 1
    assert result["a"] < 1 and result["q"] < 1
    assert [p["object"] for p in result["problems"]] == [key]
    assert err.count("\n") == 1 and f"set {backed_up.pk} has Q = " in err and key in err
    assert "sha256" in result["problems"][0]["reason"]
    backed_up.refresh_from_db()
    assert backed_up.q < 1

    # Flagged on the dashboard, the set's quality fragment and in the report.
    client.force_login(make_user("auditor"))
    page = client.get(reverse("dashboard")).content.decode()
    assert f'data-set="{backed_up.pk}"' in page and "q-bad" in page
    fragment = client.get(reverse("backups:set_quality", args=[backed_up.pk])).content.decode()
    assert 'data-q-level="bad"' in fragment and key in fragment
    report = client.get(
        reverse("reports"), {"cluster": backed_up.cluster.name, "format": "json", "download": "1"}
    )
    doc = json.loads(b"".join(report.streaming_content))
    row = next(s for s in doc["sets"] if s["id"] == backed_up.pk)
    assert row["quality"] == "bad" and row["a"] < 1 and row["problems"][0]["object"] == key


def test_deleted_object_drops_a_and_names_it(backed_up, settings):
    key = _chunk_keys(backed_up)[-1]
    (_storage_root(settings) / key).unlink()
    code, result, err = _verify_cli(backed_up.pk)
    assert code == 1
    assert result["a"] < 1 and result["q"] < 1
    assert result["problems"] == [{"object": key, "reason": result["problems"][0]["reason"]}]
    assert "missing" in result["problems"][0]["reason"]


def test_drill_on_a_good_set_restores_everything_records_rto_and_drops_scratch(
    backed_up, cluster, mariadb_servers
):
    drill_server = mariadb_servers[2]
    drill = Instance.objects.create(
        cluster=cluster, name="drill", host="127.0.0.1", port=drill_server.port, user="root"
    )
    cluster.drill_instance = drill
    cluster.save()
    code, result, _ = _verify_cli(backed_up.pk, "--drill")
    assert code == 0, result
    assert result["drill"] is True
    assert (result["q"], result["t"], result["d"], result["a"]) == (1.0, 1.0, 1.0, 1.0)
    assert result["rto_seconds"] > 0 and result["drill_instance"] == "drill"
    run = VerificationRun.objects.get(pk=result["verification"])
    assert run.rto_seconds == result["rto_seconds"]
    assert _scratch_databases(mariadb_servers, run.pk) == []


def test_drill_without_drill_instance_uses_shard_instances_and_warns(backed_up, mariadb_servers):
    code, result, _ = _verify_cli(backed_up.pk, "--drill")
    assert code == 0, result
    assert result["q"] == 1.0
    assert result["warnings"] and "no drill instance" in result["warnings"][0]
    assert _scratch_databases(mariadb_servers, result["verification"]) == []


def test_drill_with_a_damaged_chunk_fails_that_table_and_still_drops_scratch(
    backed_up, settings, mariadb_servers
):
    key = _chunk_keys(backed_up)[0]
    path = _storage_root(settings) / key
    path.write_bytes(path.read_bytes()[:-7])
    code, result, _ = _verify_cli(backed_up.pk, "--drill")
    assert code == 1
    assert result["d"] < 1 and result["t"] < 1 and result["a"] < 1
    tables = [p["table"] for p in result["problems"] if "table" in p]
    assert any(t.endswith(".t_order") for t in tables)
    assert _scratch_databases(mariadb_servers, result["verification"]) == []


def test_drill_stopped_in_the_middle_drops_every_scratch_database(backed_up, mariadb_servers):
    """Cancel after the first table loaded: the scratch databases existed, and are gone after."""
    storage = set_storage(backed_up)
    doc = engine.storage_check(
        storage,
        set_prefix(backed_up),
        hmac_key=manifest_hmac_key(),
        data_key=set_data_key(backed_up),
    ).manifest
    targets = {s["name"]: mariadb_servers[i].endpoint for i, s in enumerate(doc["shards"])}
    seen = []
    calls = {"n": 0}

    def should_cancel():
        calls["n"] += 1
        if calls["n"] > 2:
            seen.extend(_scratch_databases(mariadb_servers, 999001))
            return True
        return False

    outcome = engine.drill_run(
        doc,
        storage,
        verification_id=999001,
        targets=targets,
        data_key=None,
        should_cancel=should_cancel,
    )
    assert seen, "the drill had created scratch databases before it was stopped"
    assert outcome.error and outcome.d < 1
    assert outcome.dropped
    assert _scratch_databases(mariadb_servers, 999001) == []


def test_verify_button_queues_on_verify_and_auditor_gets_403(backed_up, client, run_jobs):
    url = reverse("backups:verify_start", args=[backed_up.pk])
    client.force_login(make_user("auditor"))
    assert client.post(url, {"drill": "0"}).status_code == 403
    assert not VerificationRun.objects.exists()
    client.force_login(make_user("approver"))
    assert client.post(url, {"drill": "1"}).status_code == 403

    client.force_login(make_user("operator"))
    response = client.post(url, {"drill": "0"})
    assert response.status_code == 302
    run = VerificationRun.objects.get(backup_set=backed_up)
    assert run.status == "pending" and run.job_id == f"verify-{run.pk}"
    assert run.job_id in django_rq.get_queue("verify").job_ids
    run_jobs("verify")
    run.refresh_from_db()
    assert run.status == "succeeded" and run.q == 1.0
    detail = client.get(reverse("backups:set_detail", args=[backed_up.pk])).content.decode()
    assert 'data-q-level="good"' in detail and "T 1.0000 · D 1.0000 · A 1.0000" in detail
    assert "Run restore drill" in detail
    listing = client.get(reverse("backups:set_list")).content.decode()
    assert 'data-q-level="good"' in listing

    client.force_login(make_user("auditor"))
    detail = client.get(reverse("backups:set_detail", args=[backed_up.pk])).content.decode()
    assert 'data-q-level="good"' in detail and "Run restore drill" not in detail


@pytest.mark.django_db(transaction=True)
def test_policy_verifies_new_sets_automatically_and_can_be_turned_off(cluster, run_jobs):
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults={"verify_automatically": True})
    first = backup_execute(backup_set=backup_start(cluster=cluster, actor="cli", enqueue=False))
    assert first.status == "succeeded", first.error
    run = VerificationRun.objects.get(backup_set=first)
    assert run.drill is False and run.status == "pending" and run.job_id == f"verify-{run.pk}"
    run_jobs("verify")
    first.refresh_from_db()
    assert first.q == 1.0 and first.verified_at is not None

    BackupPolicy.objects.filter(cluster=cluster).update(verify_automatically=False)
    second = backup_execute(backup_set=backup_start(cluster=cluster, actor="cli", enqueue=False))
    assert second.status == "succeeded", second.error
    assert not VerificationRun.objects.filter(backup_set=second).exists()


def test_only_succeeded_sets_and_operators(backed_up):
    with pytest.raises(RoleDenied):
        verification_start(backup_set=backed_up, user=make_user("auditor"))
    failed = BackupSet.objects.create(cluster=backed_up.cluster, status="failed", storage_url="x")
    with pytest.raises(VerificationError, match="only succeeded sets"):
        verification_start(backup_set=failed, user=make_user("operator"))


def test_quality_drop_sends_mail_and_webhook(backed_up, cluster, settings, run_jobs):
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        BackupPolicy.objects.update_or_create(
            cluster=cluster, defaults={"webhook_url": f"http://127.0.0.1:{server.server_port}/hook"}
        )
        settings.ALERT_EMAILS = ["dba@example.test"]
        key = _chunk_keys(backed_up)[0]
        (_storage_root(settings) / key).unlink()
        run = verification_run_now(backup_set=backed_up, user=make_user("operator"))
        assert run.q < 1
        run_jobs("default")  # the webhook is delivered by a job
    finally:
        server.shutdown()
    assert [m.to for m in mail.outbox] == [["dba@example.test"]]
    assert f"set {backed_up.pk}" in mail.outbox[0].subject and key in mail.outbox[0].body
    assert received and received[0]["alert"] == "quality_dropped"
    assert received[0]["set"] == backed_up.pk and received[0]["problems"][0]["object"] == key


# --------------------------------------------------------------------------- policies and alerts


def _set(cluster, *, days_ago=0, **fields):
    s = BackupSet.objects.create(cluster=cluster, storage_url="file:///x", **fields)
    at = timezone.now() - timedelta(days=days_ago)
    BackupSet.objects.filter(pk=s.pk).update(
        created_at=at, consistent_at=fields.get("consistent_at", at)
    )
    s.refresh_from_db()
    return s


def test_drills_are_scheduled_every_n_days_for_the_newest_set():
    cluster = Cluster.objects.create(name="drilled")
    BackupPolicy.objects.create(cluster=cluster, drill_every_days=7)
    _set(cluster, days_ago=2, status="succeeded")
    newest = _set(cluster, days_ago=1, status="succeeded")
    quiet = Cluster.objects.create(name="nodrills")  # drill_every_days = 0: off
    _set(quiet, status="succeeded")

    started = verification_drills_schedule()
    assert [(r.backup_set_id, r.drill) for r in started] == [(newest.pk, True)]
    assert verification_drills_schedule() == []  # already pending
    VerificationRun.objects.filter(pk=started[0].pk).update(
        status="succeeded", q=1.0, finished_at=timezone.now() - timedelta(days=3)
    )
    assert verification_drills_schedule() == []  # drilled 3 days ago, every 7 days
    VerificationRun.objects.filter(pk=started[0].pk).update(
        finished_at=timezone.now() - timedelta(days=8)
    )
    assert [r.backup_set_id for r in verification_drills_schedule()] == [newest.pk]


def test_sets_older_than_retention_without_passing_drill_are_flagged():
    cluster = Cluster.objects.create(name="retained")
    BackupPolicy.objects.create(cluster=cluster, retention_days=7)
    old = _set(cluster, days_ago=10, status="succeeded", q=1.0)
    drilled = _set(cluster, days_ago=10, status="succeeded", q=1.0)
    VerificationRun.objects.create(backup_set=drilled, drill=True, status="succeeded", q=1.0)
    VerificationRun.objects.filter(backup_set=drilled).update(finished_at=drilled.created_at)
    _set(cluster, days_ago=1, status="succeeded")
    assert [s.pk for s in sets_flagged_unverified_drill(cluster=cluster)] == [old.pk]
    assert set_quality(backup_set=old).needs_drill
    assert not set_quality(backup_set=drilled).needs_drill


def test_rpo_breach_and_failed_backup_alert_once(settings):
    settings.ALERT_EMAILS = ["oncall@example.test"]
    late = Cluster.objects.create(name="late")
    BackupPolicy.objects.create(cluster=late, rpo_target_minutes=60)
    _set(late, days_ago=1, status="succeeded")
    fine = Cluster.objects.create(name="fine")
    BackupPolicy.objects.create(cluster=fine, rpo_target_minutes=60)
    _set(fine, status="succeeded")

    assert alerts_check_rpo() == ["late"]
    assert alerts_check_rpo() == []  # once per breach
    assert [m.subject for m in mail.outbox] == ["[ShardVault] late is past its RPO target"]

    failed = _set(fine, status="failed", error="shard s00 unreachable")
    alert_backup_failed(failed)
    assert mail.outbox[-1].subject == f"[ShardVault] backup set {failed.pk} of fine failed"
    assert "shard s00 unreachable" in mail.outbox[-1].body


def test_drill_of_an_incremental_set_with_a_broken_chain_is_refused_in_one_sentence():
    cluster = Cluster.objects.create(name="incr")
    full = _set(cluster, status="expired")
    incremental = _set(cluster, status="succeeded", kind="incremental", parent=full)
    with pytest.raises(VerificationError, match=f"its full set {full.pk} is expired"):
        verification_start(backup_set=incremental, user=None, drill=True)
    # Drills of incremental sets are tests/backups/test_verification_incremental.py's.


def test_housekeeping_reaps_dead_runs_backfills_checks_and_arms_the_periodic_jobs_once(settings):
    settings.ALERT_EMAILS = ["oncall@example.test"]
    for periodic in queue.PERIODIC.values():
        queue.redis_connection().delete(periodic.gate_key)
    scheduled_before = set(queue.scheduled_job_ids(queue.DEFAULT))
    cluster = Cluster.objects.create(name="reaped")
    s = _set(cluster, status="succeeded")
    dead = VerificationRun.objects.create(
        backup_set=s, drill=True, status="running", heartbeat_at=timezone.now() - timedelta(hours=2)
    )
    alive = VerificationRun.objects.create(
        backup_set=_set(cluster, status="succeeded"), status="running"
    )
    VerificationRun.objects.filter(pk=alive.pk).update(heartbeat_at=timezone.now())
    never_checked = _set(cluster, status="succeeded")
    failed = _set(cluster, status="failed", error="shard s01 unreachable")

    housekeeping_reap()
    housekeeping_checks()
    dead.refresh_from_db()
    alive.refresh_from_db()
    assert dead.status == "failed" and "stopped reporting" in dead.error
    assert f"__svdrill_{dead.pk}_" in dead.error
    assert alive.status == "running"
    assert AuditEvent.objects.filter(action="verification.fail", object_id=str(dead.pk)).exists()
    backfilled = VerificationRun.objects.get(backup_set=never_checked)
    assert backfilled.drill is False and backfilled.status == "pending"
    assert [m.subject for m in mail.outbox] == [
        f"[ShardVault] backup set {failed.pk} of reaped failed"
    ]
    # Filing the backfilled check armed the reaper and the hourly checks, each exactly once.
    armed = set(queue.scheduled_job_ids(queue.DEFAULT)) - scheduled_before
    assert len(armed) == len(queue.PERIODIC)
    assert queue.periodic_ensure_scheduled() == []
    # The dead run's set can be verified again.
    assert verification_start(backup_set=s, user=None, drill=False).status == "pending"


def test_encrypted_set_verifies_and_drills_to_q_1(cluster, mariadb_servers):
    backup_set = backup_start(cluster=cluster, actor="cli", enqueue=False, encrypt=True)
    backup_set = backup_execute(backup_set=backup_set)
    assert backup_set.status == "succeeded" and backup_set.encrypted, backup_set.error
    assert all(k.endswith(".enc") for k in _chunk_keys(backup_set))
    code, result, _ = _verify_cli(backup_set.pk, "--drill")
    assert code == 0, result
    assert (result["q"], result["t"], result["d"], result["a"]) == (1.0, 1.0, 1.0, 1.0)
    assert _scratch_databases(mariadb_servers, result["verification"]) == []


def test_tampered_manifest_fails_its_signature_and_gives_q_0(backed_up, settings):
    path = _storage_root(settings) / backed_up.object_prefix / "manifest.json"
    doc = json.loads(path.read_bytes())
    doc["shards"][0]["tables"][0]["rows"] += 1  # a forged row count
    path.write_text(json.dumps(doc))
    code, result, _ = _verify_cli(backed_up.pk)
    assert code == 1
    assert result["a"] == 0 and result["q"] == 0
    assert result["problems"][0]["object"] == f"{backed_up.object_prefix}/manifest.json"


@pytest.mark.django_db(transaction=True)
def test_verify_command_runs_the_queued_automatic_check_instead_of_refusing(cluster):
    """`backup --wait` then `verify SET` must work with no worker running."""
    BackupPolicy.objects.update_or_create(cluster=cluster, defaults={"verify_automatically": True})
    backup_set = backup_execute(
        backup_set=backup_start(cluster=cluster, actor="cli", enqueue=False)
    )
    queued = VerificationRun.objects.get(backup_set=backup_set)
    assert queued.status == "pending"
    code, result, err = _verify_cli(backup_set.pk)
    assert code == 0, err
    assert result["q"] == 1.0 and result["verification"] == queued.pk
    queued.refresh_from_db()
    assert queued.status == "succeeded"
