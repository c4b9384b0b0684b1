"""Login: throttled per user and address, and never says whether a user exists."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from tests.factories import make_user

pytestmark = pytest.mark.django_db


def _login(client, username: str, password: str, address: str = "10.0.0.1"):
    return client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address
    )


def test_wrong_password_and_unknown_user_look_the_same(client):
    make_user("operator", username="olga", password="Right-pw-123")
    wrong = _login(client, "olga", "nope").content.decode()
    unknown = _login(client, "nobody", "nope", address="10.0.0.2").content.decode()
    assert "Wrong username or password." in wrong

    def normalise(html: str, name: str) -> str:
        html = re.sub(r'(csrfmiddlewaretoken" value="|X-CSRFToken": ")[^"]+', r"\1", html)
        return html.replace(name, "X")

    assert normalise(wrong, "olga") == normalise(unknown, "nobody")


def test_failed_logins_are_throttled_per_user(client, settings):
    make_user("operator", username="pete", password="Right-pw-123")
    for n in range(settings.LOGIN_THROTTLE_ATTEMPTS):
        # Different addresses: the per-user limit still applies.
        assert _login(client, "pete", "wrong", address=f"10.1.0.{n}").status_code == 200
    blocked = _login(client, "pete", "Right-pw-123", address="10.1.0.99")
    assert blocked.status_code == 429
    assert "Too many failed sign-ins" in blocked.content.decode()
    assert "_auth_user_id" not in client.session


def test_failed_logins_are_throttled_per_address_also_for_unknown_users(client, settings):
    make_user("operator", username="quinn", password="Right-pw-123")
    for n in range(settings.LOGIN_THROTTLE_ATTEMPTS):
        _login(client, f"ghost{n}", "wrong", address="10.2.0.1")
    assert _login(client, "quinn", "Right-pw-123", address="10.2.0.1").status_code == 429
    # Another address is not blocked.
    assert _login(client, "quinn", "Right-pw-123", address="10.2.0.2").status_code == 302


def test_successful_login_reaches_the_dashboard(client):
    make_user("auditor", username="rita", password="Right-pw-123")
    response = _login(client, "rita", "Right-pw-123")
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
