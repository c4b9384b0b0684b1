"""An admin adds a storage target on the Storage page; other roles never see it."""

from __future__ import annotations

import pytest

from backups.models import StorageTarget

pytestmark = pytest.mark.django_db(transaction=True)


def test_admin_adds_a_storage_target_from_the_nav(logged_in_page, tmp_path, settings):
    page = logged_in_page("admin")
    page.click("nav.mainnav >> text=Storage")
    page.wait_for_selector("#storage-targets")
    assert page.inner_text("tr[data-target=default]").startswith("default")
    page.fill("#id_name", "offsite")
    page.fill("#id_url", f"file://{tmp_path / 'offsite'}")
    page.click("#add-target button[type=submit]")
    page.wait_for_selector("tr[data-target=offsite]")
    assert "Storage target offsite added." in page.inner_text(".messages")
    assert StorageTarget.objects.get(name="offsite").created_by.username == page.user.username

    page.fill("#id_name", "offsite")
    page.fill("#id_url", "ftp://127.0.0.1/x")
    page.click("#add-target button[type=submit]")
    page.wait_for_selector(".errorlist")
    assert "not supported" in page.inner_text(".errorlist")
    assert StorageTarget.objects.count() == 1


def test_operators_see_no_storage_link(logged_in_page):
    page = logged_in_page("operator")
    assert page.locator("nav.mainnav >> text=Storage").count() == 0
    response = page.goto("/backups/storage/")
    assert response.status == 403
