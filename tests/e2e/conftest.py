"""Playwright (sync API) with Debian's Chromium against pytest-django's live server.

Browsers are never downloaded: the system `/usr/bin/chromium` runs headless.
"""

from __future__ import annotations

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
E2E_PASSWORD = "E2e-browser-pw-1"


@pytest.fixture
def browser():
    """One headless Chromium per test: Playwright's sync API allows one running instance per
    thread, and other tests start their own."""
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture
def logged_in_page(browser, live_server):
    """`logged_in_page(role)` -> a Playwright page signed in as a new user holding `role`."""
    from tests.factories import make_user

    contexts = []

    def login(role: str):
        user = make_user(role, password=E2E_PASSWORD)
        context = browser.new_context(base_url=live_server.url, accept_downloads=True)
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        page.goto("/login/")
        page.fill("#id_username", user.username)
        page.fill("#id_password", E2E_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{live_server.url}/")
        page.user = user
        return page

    yield login
    for context in contexts:
        context.close()
