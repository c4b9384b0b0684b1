"""Issue 12, item 19 (follow-up): the Content-Security-Policy allows no inline styles at all.

Progress bars used to set their width in a style attribute, which forced
`style-src-attr 'unsafe-inline'`; they are <progress> elements now, so the policy has nothing
'unsafe-' left and no template carries a style attribute (Chromium's side of it is
tests/e2e/test_trust_csp_browser.py)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.template.loader import render_to_string
from django.urls import reverse

from tests.factories import make_user


@pytest.mark.django_db
def test_the_policy_allows_nothing_unsafe_for_styles_or_scripts(client):
    client.force_login(make_user("admin"))
    for url in (reverse("login"), reverse("dashboard"), reverse("admin:index")):
        policy = client.get(url)["Content-Security-Policy"]
        assert "unsafe" not in policy, (url, policy)
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives.get("style-src-attr", "'none'") == "'none'", url
        assert directives["style-src"] == "'self'", url


def test_no_template_sets_an_inline_style():
    for path in Path("templates").rglob("*.html"):
        text = path.read_text()
        assert not re.search(r"\sstyle\s*=", text), f"{path}: inline style attribute"
        assert "<style" not in text, f"{path}: inline <style> element"


def test_progress_bars_render_as_progress_elements_with_their_value():
    backup_set = SimpleNamespace(pk=7, status="running", cancel_requested=False, error="")
    progress = SimpleNamespace(
        active=True,
        percent=42.4,
        rows_done=424,
        rows_estimate=1000,
        bytes_done=2048,
        rows_per_second=None,
        eta_seconds=None,
        text="dump s00.t",
    )
    html = render_to_string("backups/_set_progress.html", {"set": backup_set, "progress": progress})
    assert re.search(r'<progress class="progress" max="100" value="42"', html), html
    assert "style=" not in html
    progress.percent = None  # not known yet: an indeterminate bar, no made-up width
    html = render_to_string("backups/_set_progress.html", {"set": backup_set, "progress": progress})
    assert '<progress class="progress" max="100">' in html and "style=" not in html
