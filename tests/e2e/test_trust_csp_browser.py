"""Issue 12, item 19: the console works in Chromium under its strict Content-Security-Policy."""

from __future__ import annotations

import pytest


@pytest.mark.django_db(transaction=True)
def test_pages_and_htmx_polling_run_under_the_csp_without_violations(logged_in_page):
    page = logged_in_page("admin")
    refused: list[str] = []
    page.on(
        "console",
        lambda message: (
            refused.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    page.goto("/")
    assert page.evaluate("typeof htmx") == "object"
    assert page.evaluate("htmx.config.includeIndicatorStyles") is False
    # The running-jobs panel polls itself with htmx every 3 s.
    with page.expect_request(lambda r: "part=jobs" in r.url, timeout=15_000):
        pass
    for url in ("/audit/", "/admin/", "/admin/auth/user/", "/backups/"):
        page.goto(url)
    assert refused == []
