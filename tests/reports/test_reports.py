"""Auditor reports: every set with its quality, RPO/RTO, every restore with its approval chain,
in CSV, JSON and PDF, each stating its own sha256 and the audit head it was built from."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from django.utils import timezone

from backups.models import Approval, BackupSet, RestoreRequest, RestoreRun, VerificationRun
from console.audit import audit_chain_head, audit_record
from reports.reports import report_check
from shards.models import Cluster
from tests.factories import make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def history():
    """A month with a failed backup, a good drilled set, a damaged set, a rejected and an
    approved restore."""
    cluster = Cluster.objects.create(name="orders")
    now = timezone.now()
    alice = make_user("operator", "alice")
    bob = make_user("approver", "bob")
    carol = make_user("approver", "carol")

    def made(days_ago, **fields):
        s = BackupSet.objects.create(cluster=cluster, storage_url="file:///x", **fields)
        at = now - timedelta(days=days_ago)
        BackupSet.objects.filter(pk=s.pk).update(
            created_at=at, started_at=at, finished_at=at + timedelta(minutes=5)
        )
        s.refresh_from_db()
        return s

    good = made(
        10, status="succeeded", consistent_at=now - timedelta(days=10), rows=1000,
        stored_bytes=4096, raw_bytes=9000, q=1.0, verified_at=now - timedelta(days=9),
    )  # fmt: skip
    VerificationRun.objects.create(
        backup_set=good, drill=True, status="succeeded", t=1, d=1, a=1, q=1.0, rto_seconds=42.5,
        finished_at=now - timedelta(days=9), drill_instance_name="drill",
    )  # fmt: skip
    failed = made(
        6, status="failed", error="shard s01 unreachable: m1 (127.0.0.1:1) did not answer"
    )
    damaged = made(
        3, status="succeeded", consistent_at=now - timedelta(days=3), rows=1000, q=0.5,
        verified_at=now - timedelta(days=2),
    )  # fmt: skip
    VerificationRun.objects.create(
        backup_set=damaged, status="succeeded", t=0.5, d=0.5, a=0.75, q=0.5 * 0.5 * 0.75,
        finished_at=now - timedelta(days=2),
        problems=[{"object": f"orders/{damaged.pk}/s00/db/t/chunk-000002.tsv.zst", "reason": "sha256 mismatch"}],
    )  # fmt: skip
    rejected = RestoreRequest.objects.create(
        cluster=cluster, source_set=good, target_kind="inplace", reason="undo bad migration",
        requested_by=alice, state="rejected", approvals_required=2, expires_at=now + timedelta(days=1),
        plan={"tables": [{}, {}], "rows": 1000, "objects": 6},
    )  # fmt: skip
    Approval.objects.create(
        request=rejected, approver=bob, decision="reject", comment="use a side restore"
    )
    approved = RestoreRequest.objects.create(
        cluster=cluster, source_set=good, target_kind="side", reason="recover deleted orders",
        requested_by=alice, state="succeeded", approvals_required=1, expires_at=now + timedelta(days=1),
        plan={"tables": [{}], "rows": 500},
    )  # fmt: skip
    Approval.objects.create(
        request=approved, approver=carol, decision="approve", comment="ok, ticket 42"
    )
    RestoreRun.objects.create(
        request=approved, status="succeeded", q=1.0, started_at=now, finished_at=now
    )
    audit_record(actor=alice, action="restore.request", obj=approved)
    return {"cluster": cluster, "good": good, "failed": failed, "damaged": damaged,
            "rejected": rejected, "approved": approved}  # fmt: skip


def _download(client, fmt, cluster="orders", **extra):
    return client.get(
        reverse("reports"), {"cluster": cluster, "format": fmt, "download": "1", **extra}
    )


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_csv_report_lists_sets_restores_and_approval_chain(client, history):
    client.force_login(make_user("auditor"))
    response = _download(client, "csv")
    assert response.status_code == 200 and response.streaming
    content = _body(response)
    assert report_check(content)
    last = content.decode().rstrip("\n").rsplit("\n", 1)[1]
    body = content[: content.rstrip(b"\n").rfind(b"\n") + 1]
    assert last == f"report_sha256,{hashlib.sha256(body).hexdigest()}"

    rows = list(csv.reader(io.StringIO(content.decode())))
    meta = {r[1]: r[2] for r in rows if r[0] == "report"}
    assert meta["cluster"] == "orders" and meta["audit_head"] == audit_chain_head()
    header = {}
    sections: dict[str, list[dict]] = {}
    for r in rows:
        if r[0] == "section":
            current = r[1:]
            continue
        if r[0] in ("report", "report_sha256"):
            continue
        sections.setdefault(r[0], []).append(dict(zip(current, r[1:], strict=True)))
        header[r[0]] = current
    sets = {int(s["id"]): s for s in sections["sets"]}
    assert sets[history["failed"].pk]["status"] == "failed"
    assert "unreachable" in sets[history["failed"].pk]["error"]
    assert sets[history["damaged"].pk]["quality"] == "bad"
    assert "chunk-000002" in sets[history["damaged"].pk]["problems"]
    assert sets[history["good"].pk]["q"] == "1.0" and sets[history["good"].pk]["last_drill_at"]
    restores = {int(r["id"]): r for r in sections["restores"]}
    assert restores[history["rejected"].pk]["state"] == "rejected"
    assert "reject by bob" in restores[history["rejected"].pk]["approval_chain"]
    assert "use a side restore" in restores[history["rejected"].pk]["approval_chain"]
    assert restores[history["approved"].pk]["outcome"] == "succeeded"
    approvals = [
        (a["request"], a["by"], a["decision"], a["comment"]) for a in sections["approvals"]
    ]
    assert (str(history["approved"].pk), "carol", "approve", "ok, ticket 42") in approvals
    summary = {s["metric"]: s["value"] for s in sections["summary"]}
    assert float(summary["success_rate"]) == pytest.approx(2 / 3, rel=1e-4)
    assert float(summary["achieved_rpo_seconds"]) >= 7 * 86400 - 5  # 10 days ago -> 3 days ago
    assert float(summary["rto_seconds_max"]) == 42.5
    drills = sections["drills"]
    assert drills[0]["rto_seconds"] == "42.5"


def test_json_report_parses_and_states_its_hash(client, history):
    client.force_login(make_user("auditor"))
    content = _body(_download(client, "json"))
    doc = json.loads(content)
    assert report_check(content)
    body = content[: content.rstrip(b"\n").rfind(b"\n") + 1]
    assert doc["report_sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["audit_head"] == audit_chain_head()
    statuses = {s["id"]: s["status"] for s in doc["sets"]}
    assert statuses[history["failed"].pk] == "failed"
    by_id = {r["id"]: r for r in doc["restores"]}
    assert by_id[history["rejected"].pk]["approvals"] == [
        {"by": "bob", "decision": "reject", "comment": "use a side restore",
         "at": by_id[history["rejected"].pk]["approvals"][0]["at"]}
    ]  # fmt: skip
    assert by_id[history["approved"].pk]["approvals"][0]["by"] == "carol"
    assert by_id[history["approved"].pk]["runs"][0]["status"] == "succeeded"
    assert doc["summary"]["by_status"]["failed"] == 1
    assert doc["summary"]["rpo_met"] is False  # a 7-day gap against the default 24 h target
    tampered = content.replace(b"use a side restore", b"use a side restorE")
    assert not report_check(tampered)


def test_pdf_report_has_title_summary_chart_and_tables(client, history, tmp_path):
    client.force_login(make_user("auditor"))
    response = _download(client, "pdf")
    content = _body(response)
    assert content.startswith(b"%PDF")
    assert response["X-Report-SHA256"] == hashlib.sha256(content).hexdigest()
    assert response["X-Audit-Head"] == audit_chain_head()
    path = tmp_path / "r.pdf"
    path.write_bytes(content)
    raw = subprocess.run(["pdftotext", "-raw", str(path), "-"], capture_output=True, check=True)
    text = " ".join(raw.stdout.decode().split())  # table cells wrap inside their column
    assert "ShardVault backup and restore report" in text and "Cluster orders" in text
    assert audit_chain_head() in text
    assert "Success rate" in text and "66.7 %" in text
    assert "Achieved RPO" in text and "Quality Q of each set" in text
    assert "42.5 s" in text  # measured RTO
    assert "failed" in text and "unreachable" in text
    assert "reject by bob" in text and "use a side restore" in text
    assert "approve by carol" in text and "ok, ticket 42" in text


def test_report_command_writes_each_format_with_hashes(history, tmp_path):
    for fmt in ("csv", "json", "pdf"):
        out = StringIO()
        target = tmp_path / f"report.{fmt}"
        call_command("report", "orders", "--format", fmt, "-o", str(target), stdout=out)
        content = target.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        assert f"sha256={digest}" in out.getvalue()
        assert f"audit_head={audit_chain_head()}" in out.getvalue()
        if fmt == "pdf":
            assert (tmp_path / "report.pdf.sha256").read_text() == f"{digest}  report.pdf\n"
            check = subprocess.run(
                ["sha256sum", "-c", "report.pdf.sha256"], cwd=tmp_path, capture_output=True
            )
            assert check.returncode == 0
        else:
            head = subprocess.run(
                ["head", "-n", "-1", str(target)], capture_output=True, check=True
            ).stdout
            assert (
                hashlib.sha256(head).hexdigest() in content.decode().rstrip("\n").rsplit("\n", 1)[1]
            )


def test_report_period_excludes_older_sets(history, tmp_path):
    since = (timezone.now() - timedelta(days=5)).date().isoformat()
    target = tmp_path / "r.json"
    call_command(
        "report",
        "orders",
        "--since",
        since,
        "--format",
        "json",
        "-o",
        str(target),
        stdout=StringIO(),
    )
    doc = json.loads(target.read_bytes())
    assert {s["id"] for s in doc["sets"]} == {history["damaged"].pk}
    # Both restore requests were filed now, inside the period.
    assert {r["id"] for r in doc["restores"]} == {history["rejected"].pk, history["approved"].pk}
    assert all(r["created_at"] >= since for r in doc["restores"])


def test_report_command_refuses_unknown_cluster_in_one_line(history, tmp_path):
    with pytest.raises(CommandError, match="no cluster named 'nope'"):
        call_command("report", "nope", "--format", "csv", "-o", str(tmp_path / "x.csv"))
    with pytest.raises(CommandError, match="not a date"):
        call_command(
            "report",
            "orders",
            "--since",
            "yesterday",
            "--format",
            "csv",
            "-o",
            str(tmp_path / "x.csv"),
        )


@pytest.mark.parametrize("role", ["operator", "approver", None])
def test_only_auditors_and_admins_download_reports(client, history, role):
    client.force_login(make_user(role))
    assert _download(client, "csv").status_code == 403
    assert client.get(reverse("reports")).status_code == 403


def test_admin_downloads_and_bad_cluster_is_one_sentence(client, history):
    client.force_login(make_user("admin"))
    assert _download(client, "json").status_code == 200
    response = _download(client, "csv", cluster="nope")
    assert response.status_code == 400
    assert "No cluster named &#x27;nope&#x27;." in response.content.decode()


def test_pdf_report_shows_a_and_q_per_storage_target(client, history, tmp_path):
    from backups.models import SetCopy

    good = history["good"]
    SetCopy.objects.create(backup_set=good, target="offsite", state="complete")
    VerificationRun.objects.create(
        backup_set=good, status="succeeded", target="offsite", t=1, d=1, a=0.625, q=0.625,
        finished_at=timezone.now() - timedelta(days=1),
    )  # fmt: skip
    client.force_login(make_user("auditor"))
    path = tmp_path / "r.pdf"
    path.write_bytes(_body(_download(client, "pdf")))
    raw = subprocess.run(["pdftotext", "-raw", str(path), "-"], capture_output=True, check=True)
    text = " ".join(raw.stdout.decode().split())
    assert "Storage targets: A and Q per target" in text
    assert f"{good.pk} offsite complete 0.6250 0.6250" in text
    assert f"{good.pk} default complete - -" in text
