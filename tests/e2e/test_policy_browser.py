"""In the browser: an admin edits a cluster's policy, sees the next runs, and an invalid cron
is refused inline (nothing saved)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from backups.models import BackupPolicy
from console.models import AuditEvent
from shards.models import Cluster

pytestmark = pytest.mark.django_db(transaction=True)


def save_policy(page) -> None:
    """Click save and wait for the form's own answer: the inline check's error already names
    the field, so without waiting a later fill could be overwritten by the late swap."""
    with page.expect_response(
        lambda r: (
            r.request.method == "POST" and r.request.headers.get("hx-trigger") == "policy-form"
        )
    ):
        page.click("#save-policy")


def test_admin_edits_a_policy_sees_the_next_runs_and_a_bad_cron_is_refused(
    logged_in_page, unique_name
):
    name = f"pol{unique_name}"
    cluster = Cluster.objects.create(name=name)
    page = logged_in_page("admin")

    page.goto(f"/topology/clusters/{name}/")
    page.click("#policy-link")
    expect(page.locator("h1")).to_contain_text(f"Policy of cluster {name}")
    expect(page.locator("#no-runs")).to_be_visible()

    # An invalid cron: refused inline as soon as the field changes, nothing saved.
    page.fill("#id_full_cron", "61 25 * * *")
    page.locator("#id_full_cron").press("Tab")
    expect(page.locator("#errors-full_cron")).to_contain_text("not a valid cron expression")
    save_policy(page)
    expect(page.locator("#errors-full_cron")).to_contain_text("full_cron")
    assert not BackupPolicy.objects.filter(cluster=cluster).exclude(full_cron="").exists()

    # A good cron: the preview lists the next five runs, then the policy is saved.
    page.fill("#id_full_cron", "45 1 * * *")
    page.locator("#id_full_cron").press("Tab")
    expect(page.locator("#errors-full_cron li")).to_have_count(0)
    expect(page.locator(".next-run")).to_have_count(5)
    expect(page.locator(".next-run").first).to_contain_text("01:45 UTC")
    page.fill("#id_keep_daily", "10")
    page.fill("#id_exclude_tables", "scratch.*")
    save_policy(page)
    expect(page.locator("#policy-saved")).to_be_visible()

    policy = BackupPolicy.objects.get(cluster=cluster)
    assert (policy.full_cron, policy.keep_daily, policy.exclude_tables) == (
        "45 1 * * *",
        10,
        ["scratch.*"],
    )
    event = AuditEvent.objects.get(action="policy.update")
    assert event.actor == page.user and event.details["new"]["full_cron"] == "45 1 * * *"
    # The saved form shows the stored values after a reload.
    page.reload()
    expect(page.locator("#id_full_cron")).to_have_value("45 1 * * *")
    expect(page.locator(".next-run")).to_have_count(5)


def test_an_operator_gets_no_policy_page(logged_in_page, unique_name):
    name = f"pol{unique_name}"
    Cluster.objects.create(name=name)
    page = logged_in_page("operator")
    page.goto(f"/topology/clusters/{name}/")
    expect(page.locator("#policy-link")).to_have_count(0)
    response = page.goto(f"/backups/policy/{name}/")
    assert response.status == 403
