"""Backup policies: the service's checks and audit, `manage.py policy show|set`, next runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import call_command

from backups.models import BackupPolicy
from backups.selectors.policies import next_runs, policy_json
from backups.services.policies import PolicyInvalid, policy_update
from console.models import AuditEvent
from shards.models import Cluster
from tests.factories import make_user

pytestmark = pytest.mark.django_db

DESIGN_KEYS = {
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


@pytest.fixture
def cluster():
    return Cluster.objects.create(name="orders")


def policy(argv, *, fail=False):
    out, err = StringIO(), StringIO()
    if fail:
        with pytest.raises(SystemExit) as exited:
            call_command("policy", *argv, stdout=out, stderr=err)
        assert exited.value.code == 1
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1, err.getvalue()
        return lines[0]
    call_command("policy", *argv, stdout=out, stderr=err)
    return out.getvalue()


def test_policy_show_json_has_exactly_the_design_keys_and_defaults(cluster):
    doc = json.loads(policy(["show", "orders", "--json"]))
    assert set(doc) == DESIGN_KEYS
    assert doc["cluster"] == "orders"
    assert doc["full_cron"] == "" and doc["full_consistency"] == "locked"
    assert doc["full_method"] == "logical"
    assert (doc["keep_full"], doc["keep_daily"], doc["keep_weekly"], doc["keep_monthly"]) == (
        7,
        7,
        4,
        6,
    )
    assert doc["keep_days"] == 7 and doc["copy_to"] == [] and doc["exclude_tables"] == []
    assert doc["max_threads_running"] == 0 and doc["incremental_every_minutes"] == 0


def test_policy_set_changes_every_named_field_and_audits_old_and_new_values(cluster):
    admin = make_user("admin", "root-admin")
    doc = json.loads(
        policy(
            [
                "set",
                "orders",
                "--full-cron",
                "0 2 * * *",
                "--full-consistency",
                "lockfree",
                "--full-method",
                "logical",
                "--exclude-tables",
                "scratch.*,*.tmp_*",
                "--max-threads-running",
                "40",
                "--incremental-every",
                "5",
                "--keep-full",
                "3",
                "--keep-daily",
                "14",
                "--keep-weekly",
                "8",
                "--keep-monthly",
                "12",
                "--keep-days",
                "2",
                "--copy-to",
                "default",
                "--encrypt",
                "on",
                "--rpo-minutes",
                "60",
                "--drill-every-days",
                "7",
                "--webhook",
                "https://hooks.example.test/shardvault",
                "--as",
                "root-admin",
                "--json",
            ]
        )
    )
    assert doc["full_cron"] == "0 2 * * *" and doc["full_consistency"] == "lockfree"
    assert doc["exclude_tables"] == ["scratch.*", "*.tmp_*"] and doc["copy_to"] == ["default"]
    assert doc["incremental_every_minutes"] == 5 and doc["keep_daily"] == 14
    assert doc["encrypt"] is True and doc["rpo_target_minutes"] == 60
    assert doc["webhook_url"] == "https://hooks.example.test/shardvault"
    events = list(AuditEvent.objects.filter(action="policy.update"))
    assert len(events) == 1
    assert events[0].actor == admin
    assert events[0].details["old"]["keep_daily"] == 7
    assert events[0].details["new"]["keep_daily"] == 14
    assert events[0].details["old"]["full_cron"] == ""

    # `none` clears lists, the cron and the webhook; setting the same values again audits nothing.
    doc = json.loads(
        policy(
            [
                "set",
                "orders",
                "--full-cron",
                "none",
                "--exclude-tables",
                "none",
                "--copy-to",
                "none",
                "--webhook",
                "none",
                "--keep-daily",
                "14",
                "--as",
                "root-admin",
                "--json",
            ]
        )
    )
    assert doc["full_cron"] == "" and doc["exclude_tables"] == [] and doc["copy_to"] == []
    assert doc["webhook_url"] == "" and doc["keep_daily"] == 14
    last = AuditEvent.objects.filter(action="policy.update").order_by("-id").first()
    assert "keep_daily" not in last.details["new"]
    assert AuditEvent.objects.filter(action="policy.update").count() == 2


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--full-cron", "61 * * * *", "full_cron"),
        ("--full-cron", "every night", "full_cron"),
        ("--copy-to", "offsite", "copy_to"),
        ("--keep-full", "-1", "keep_full"),
        ("--max-threads-running", "lots", "max_threads_running"),
        ("--full-consistency", "sloppy", "full_consistency"),
        ("--full-method", "magic", "full_method"),
        ("--exclude-tables", "no_dot_here", "exclude_tables"),
    ],
)
def test_a_bad_value_is_refused_in_one_sentence_naming_the_field_and_nothing_is_saved(
    cluster, flag, value, field
):
    make_user("admin", "root-admin")
    line = policy(
        ["set", "orders", "--keep-daily", "30", flag, value, "--as", "root-admin"], fail=True
    )
    assert field in line
    stored = BackupPolicy.objects.filter(cluster=cluster).first()
    assert stored is None or stored.keep_daily == 7
    assert not AuditEvent.objects.filter(action="policy.update").exists()


def test_only_an_admin_may_set_a_policy(cluster):
    make_user("operator", "op")
    line = policy(["set", "orders", "--keep-full", "3", "--as", "op"], fail=True)
    assert "admin" in line
    with pytest.raises(PolicyInvalid):
        policy_update(cluster=cluster, actor=make_user("admin"), changes={"keep_full": -3})
    assert not BackupPolicy.objects.filter(cluster=cluster, keep_full=3).exists()


def test_next_runs_merge_the_cron_and_the_incremental_grid_in_utc(cluster):
    policy_row = BackupPolicy(cluster=cluster, full_cron="0 2 * * *", incremental_every_minutes=0)
    now = datetime(2026, 3, 1, 1, 30, tzinfo=UTC)
    runs = next_runs(policy_row, 5, now=now)
    assert [r["at"] for r in runs] == [datetime(2026, 3, d, 2, 0, tzinfo=UTC) for d in range(1, 6)]
    assert {r["kind"] for r in runs} == {"full"}

    policy_row.incremental_every_minutes = 15
    runs = next_runs(policy_row, 5, now=now)
    assert [(r["at"].strftime("%H:%M"), r["kind"]) for r in runs] == [
        ("01:45", "incremental"),
        ("02:00", "full"),  # a full and an incremental due together: the full runs
        ("02:15", "incremental"),
        ("02:30", "incremental"),
        ("02:45", "incremental"),
    ]
    assert policy_json(policy_row)["incremental_every_minutes"] == 15


# ------------------------------------------------------------------------------ the page


def form_values(**overrides):
    values = {
        "full_cron": "",
        "full_consistency": "locked",
        "incremental_every_minutes": "0",
        "keep_full": "7",
        "keep_daily": "7",
        "keep_weekly": "4",
        "keep_monthly": "6",
        "keep_days": "7",
        "copy_to": "",
        "full_method": "logical",
        "exclude_tables": "",
        "max_threads_running": "0",
        "compression_level": "1",
        "rpo_target_minutes": "1440",
        "drill_every_days": "0",
        "webhook_url": "",
    }
    values.update(overrides)
    return values


@pytest.mark.parametrize("role", ["operator", "approver", "auditor"])
def test_the_policy_page_is_for_admins_only(client, cluster, role):
    from django.urls import reverse

    client.force_login(make_user(role))
    assert client.get(reverse("backups:policy", args=["orders"])).status_code == 403
    url = reverse("backups:policy_validate", args=["orders"])
    assert client.post(url, form_values()).status_code == 403
    assert client.post(reverse("backups:policy", args=["orders"]), form_values()).status_code == 403
    page = client.get(reverse("shards:cluster_detail", args=["orders"])).content.decode()
    assert 'id="policy-link"' not in page


def test_admin_edits_the_policy_with_inline_validation_and_a_preview(client, cluster):
    from django.urls import reverse

    client.force_login(make_user("admin", "page-admin"))
    page = client.get(reverse("shards:cluster_detail", args=["orders"])).content.decode()
    assert reverse("backups:policy", args=["orders"]) in page

    validate = reverse("backups:policy_validate", args=["orders"])
    html = client.post(validate, form_values(full_cron="61 * * * *"), HTTP_HX_REQUEST="true")
    html = html.content.decode()
    assert 'id="errors-full_cron" role="alert"><li>full_cron' in html and "cron" in html
    assert not BackupPolicy.objects.filter(cluster=cluster).exclude(full_cron="").exists()

    html = client.post(
        validate, form_values(full_cron="30 4 * * *"), HTTP_HX_REQUEST="true"
    ).content.decode()
    assert "<li>" not in html.split('id="next-runs"')[0]  # no error anywhere
    assert html.count('class="next-run"') == 5 and "04:30 UTC" in html
    assert not AuditEvent.objects.filter(action="policy.update").exists()  # nothing saved yet

    response = client.post(
        reverse("backups:policy", args=["orders"]),
        form_values(full_cron="30 4 * * *", keep_daily="21", exclude_tables="scratch.*"),
    )
    assert response.status_code == 302
    stored = BackupPolicy.objects.get(cluster=cluster)
    assert (stored.full_cron, stored.keep_daily, stored.exclude_tables) == (
        "30 4 * * *",
        21,
        ["scratch.*"],
    )
    event = AuditEvent.objects.get(action="policy.update")
    assert event.actor.username == "page-admin" and event.details["new"]["keep_daily"] == 21

    # A bad save keeps the stored policy and says which field is wrong.
    response = client.post(reverse("backups:policy", args=["orders"]), form_values(keep_days="-1"))
    assert response.status_code == 400 and "keep_days" in response.content.decode()
    assert BackupPolicy.objects.get(cluster=cluster).keep_days == 7
