"""An auditor signs in with Chromium, sees each cluster's health and downloads a PDF report."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import timedelta

import pytest
from django.utils import timezone

from backups.models import Approval, BackupSet, RestoreRequest, VerificationRun
from shards.models import Cluster
from tests.factories import make_user


@pytest.mark.django_db(transaction=True)
def test_auditor_sees_health_and_downloads_a_pdf_report(logged_in_page, tmp_path):
    cluster = Cluster.objects.create(name="payments")
    now = timezone.now()
    good = BackupSet.objects.create(
        cluster=cluster, status="succeeded", storage_url="file:///x", consistent_at=now - timedelta(hours=2),
        started_at=now - timedelta(hours=2), finished_at=now - timedelta(hours=2), q=1.0, verified_at=now,
    )  # fmt: skip
    VerificationRun.objects.create(
        backup_set=good,
        drill=True,
        status="succeeded",
        t=1,
        d=1,
        a=1,
        q=1.0,
        rto_seconds=8.0,
        finished_at=now,
    )
    request = RestoreRequest.objects.create(
        cluster=cluster, source_set=good, target_kind="side", reason="restore yesterday's refunds",
        requested_by=make_user("operator", "olga"), state="approved", expires_at=now + timedelta(days=1),
    )  # fmt: skip
    Approval.objects.create(
        request=request, approver=make_user("approver", "arne"), decision="approve", comment="fine"
    )

    page = logged_in_page("auditor")
    row = page.locator('tr[data-cluster="payments"]')
    assert "Q 1.0000" in row.inner_text()
    assert row.get_attribute("class") == "health-good"
    assert "Nothing running." in page.locator("#running-jobs").inner_text()

    page.click("text=Reports")
    page.select_option("select[name=cluster]", "payments")
    page.select_option("select[name=format]", "pdf")
    headers = {}
    page.on("response", lambda r: headers.update(r.headers) if "download=1" in r.url else None)
    with page.expect_download() as info:
        page.click("text=Download report")
    download = info.value
    target = tmp_path / download.suggested_filename
    download.save_as(target)
    content = target.read_bytes()
    assert target.suffix == ".pdf" and content.startswith(b"%PDF")
    text = " ".join(
        subprocess.run(["pdftotext", "-raw", str(target), "-"], capture_output=True, check=True)
        .stdout.decode()
        .split()
    )
    assert "Cluster payments" in text
    assert "approve by arne" in text and "restore yesterday's refunds" in text
    assert headers["x-report-sha256"] == hashlib.sha256(content).hexdigest()
