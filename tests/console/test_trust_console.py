"""Issue 12, console side: redirects, CSV exports, the demo seeder, logins, the Django admin,
identity changes in the audit log and the production security headers."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from django.utils import timezone

from backups.models import Approval, BackupSet, RestoreRequest
from console.models import AuditEvent
from shards.models import Cluster
from tests.factories import make_user

pytestmark = pytest.mark.django_db


# ---- 13: the verify button's `next` stays on this console ----------------------------------


@pytest.mark.parametrize("evil", ["/\\evil.com", "//evil.com", "https://evil.com/", "/\\/evil.com"])
def test_verify_button_does_not_redirect_to_another_host(client, evil):
    backup_set = BackupSet.objects.create(
        cluster=Cluster.objects.create(name="redir"), storage_url="file:///x"
    )
    client.force_login(make_user("operator"))
    response = client.post(reverse("backups:verify_start", args=[backup_set.pk]), {"next": evil})
    assert response.status_code == 302
    assert response["Location"] == reverse("backups:set_detail", args=[backup_set.pk])


def test_verify_button_still_returns_to_a_local_page(client):
    backup_set = BackupSet.objects.create(
        cluster=Cluster.objects.create(name="redir2"), storage_url="file:///x"
    )
    client.force_login(make_user("operator"))
    response = client.post(
        reverse("backups:verify_start", args=[backup_set.pk]), {"next": "/backups/?cluster=x"}
    )
    assert response["Location"] == "/backups/?cluster=x"


# ---- 14: CSV exports never hand a spreadsheet a formula ------------------------------------

FORMULAS = ['=HYPERLINK("http://evil")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]


def _csv_rows(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))


def test_audit_csv_export_neutralises_formulas_in_failed_login_names(client):
    for n, name in enumerate(FORMULAS):
        client.post(
            reverse("login"), {"username": name, "password": "x"}, REMOTE_ADDR=f"10.9.0.{n}"
        )
    client.force_login(make_user("auditor"))
    rows = _csv_rows(client.get(reverse("audit_export"), {"action": "login.failed"}))
    actors = [r[2] for r in rows[1:]]
    reprs = [r[6] for r in rows[1:]]
    assert len(actors) == len(FORMULAS)
    for cell in actors + reprs:
        assert cell[0] not in "=+-@\t\r", cell
    assert '\'=HYPERLINK("http://evil")' in actors


def test_report_csv_neutralises_formulas_in_reasons_and_comments(client):
    cluster = Cluster.objects.create(name="formulas")
    good = BackupSet.objects.create(cluster=cluster, storage_url="file:///x", status="succeeded")
    request = RestoreRequest.objects.create(
        cluster=cluster, source_set=good, target_kind="side", reason="=cmd|' /C calc'!A0",
        requested_by=make_user("operator", "=evilname"), state="rejected",
        expires_at=timezone.now() + timedelta(days=1),
    )  # fmt: skip
    Approval.objects.create(
        request=request, approver=make_user("approver"), decision="reject", comment="@SUM(1)"
    )
    client.force_login(make_user("auditor"))
    response = client.get(
        reverse("reports"), {"cluster": "formulas", "format": "csv", "download": "1"}
    )
    rows = _csv_rows(response)
    cells = [cell for row in rows for cell in row]
    assert "'=cmd|' /C calc'!A0" in cells and "'@SUM(1)" in cells and "'=evilname" in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r")]


# ---- 18: seed_demo refuses to create known passwords on a production console ---------------


def test_seed_demo_refuses_without_debug_or_force(settings):
    settings.DEBUG = False
    with pytest.raises(CommandError) as refused:
        call_command("seed_demo", "--port", "1", stdout=StringIO())
    message = str(refused.value)
    assert "--force" in message and "\n" not in message
    assert not Cluster.objects.filter(name="demo").exists()


def test_seed_demo_with_debug_goes_on_to_the_server(settings):
    settings.DEBUG = True
    with pytest.raises(CommandError) as failed:
        # Port 1 answers nothing: the command got past the DEBUG check to the connection.
        call_command("seed_demo", "--port", "1", stdout=StringIO())
    assert str(failed.value).startswith("cannot seed the demo: ")


# ---- 7: the throttle counts a name the way authentication reads it -------------------------


def _login(client, username: str, password: str, address: str, path: str | None = None):
    return client.post(
        path or reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address
    )


def test_login_throttle_counts_spaced_and_fullwidth_spellings_as_one_user(client, settings):
    make_user("operator", username="alice", password="Right-pw-123")
    spellings = [" alice", "ａｌｉｃｅ", "ALICE ", "alice\t", "Ａlice"]
    for n in range(settings.LOGIN_THROTTLE_ATTEMPTS):
        _login(client, spellings[n % len(spellings)], "wrong", address=f"10.3.0.{n}")
    blocked = _login(client, "alice", "Right-pw-123", address="10.3.0.99")
    assert blocked.status_code == 429
    assert "_auth_user_id" not in client.session


# ---- 4: the Django admin's sign-in is the console's throttled, audited one ------------------


def test_admin_login_is_throttled_and_audited(client, settings):
    make_user("admin", username="root-admin", password="Right-pw-123")
    url = reverse("admin:login")
    for n in range(12):
        response = _login(client, "root-admin", f"wrong-{n}", address=f"10.4.0.{n}", path=url)
        assert "_auth_user_id" not in client.session
    assert response.status_code == 429
    failed = AuditEvent.objects.filter(action="login.failed", actor_name="root-admin").count()
    assert failed == settings.LOGIN_THROTTLE_ATTEMPTS
    # Even the right password is refused while throttled.
    assert _login(client, "root-admin", "Right-pw-123", "10.4.0.99", path=url).status_code == 429


def test_admin_login_signs_in_an_admin_and_lands_on_the_admin(client):
    admin_user = make_user("admin", username="ada", password="Right-pw-123")
    response = _login(client, "ada", "Right-pw-123", "10.5.0.1", path=reverse("admin:login"))
    assert response.status_code == 302 and response["Location"] == reverse("admin:index")
    assert AuditEvent.objects.filter(action="login", actor=admin_user).exists()
    assert client.get(reverse("admin:index")).status_code == 200
    assert client.get(reverse("admin:login")).status_code == 302


def test_admin_login_shows_the_form_to_a_signed_in_non_admin(client):
    client.force_login(make_user("operator"))
    assert client.get(reverse("admin:index"))["Location"].startswith(reverse("admin:login"))
    assert client.get(reverse("admin:login")).status_code == 200


# ---- 5: every identity change is in the hash chain, with the OS user for commands ----------


def _events(action: str, user) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action, object_id=str(user.pk)))


def test_role_grant_in_the_django_admin_is_audited_with_its_admin(client):
    from django.contrib.auth.models import Group

    admin_user = make_user("admin", username="adm")
    target = make_user("operator", username="olivia")
    client.force_login(admin_user)
    url = reverse("admin:auth_user_change", args=[target.pk])
    groups = [Group.objects.get(name="operator").pk, Group.objects.get(name="approver").pk]
    response = client.post(
        url,
        {
            "username": "olivia", "first_name": "", "last_name": "", "email": "",
            "is_active": "on", "groups": groups, "user_permissions": [],
            "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
            "last_login_0": "", "last_login_1": "",
        },
    )  # fmt: skip
    assert response.status_code == 302, response.content.decode()[:2000]
    [granted] = _events("user.groups_changed", target)[-1:]
    assert granted.details["added"] == ["approver"] and granted.actor == admin_user
    assert "os_user" not in granted.details


def test_password_reset_and_reactivation_in_the_django_admin_are_audited(client):
    admin_user = make_user("admin", username="adm2")
    target = make_user("auditor", username="paula")
    client.force_login(admin_user)
    response = client.post(
        reverse("admin:auth_user_password_change", args=[target.pk]),
        {"password1": "A-new-pw-8812", "password2": "A-new-pw-8812", "usable_password": "true"},
    )
    assert response.status_code == 302
    [reset] = _events("user.password_changed", target)
    assert reset.actor == admin_user and "A-new-pw" not in str(reset.details)
    target.refresh_from_db()
    target.is_active = False
    target.save()
    target.is_active = True
    target.save()
    assert _events("user.deactivated", target) and _events("user.reactivated", target)


def test_group_membership_and_permission_changes_from_any_side_are_audited():
    from django.contrib.auth.models import Group, Permission

    user = make_user(None, username="gina")
    group = Group.objects.create(name="custom-team")
    group.user_set.add(user)  # from the group's side
    permission = Permission.objects.get(codename="view_auditevent")
    group.permissions.add(permission)
    user.user_permissions.add(permission)
    user.groups.clear()
    assert _events("user.groups_changed", user)[0].details["added"] == ["custom-team"]
    assert _events("user.groups_changed", user)[1].details["removed"] == ["custom-team"]
    [perm] = _events("group.permissions_changed", group)
    assert perm.details["added"] == ["console.view_auditevent"]
    assert _events("user.permissions_changed", user)
    assert _events("group.created", group)
    assert AuditEvent.objects.filter(action="user.created", object_id=str(user.pk)).exists()


def test_events_written_by_a_command_record_the_os_user():
    import getpass

    call_command("users", "create", "carl", "--role", "operator", stdout=StringIO())
    [created] = AuditEvent.objects.filter(action="user.create", object_repr="carl")
    assert created.details["os_user"] == getpass.getuser()
    assert created.details["role"] == "operator"
    # One event for the command's user, not the receivers' pair as well.
    assert not AuditEvent.objects.filter(action="user.created", object_repr="carl").exists()
    out = StringIO()
    call_command("audit", "verify", stdout=out)
    assert "intact" in out.getvalue()


# ---- 19: production defaults: CSP, secure cookies and HSTS over HTTPS, short sessions -------


def test_every_page_carries_a_strict_content_security_policy(client):
    client.force_login(make_user("admin"))
    for url in (reverse("login"), reverse("dashboard"), reverse("admin:index")):
        policy = client.get(url)["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["script-src"] == "'self'", url
        assert "unsafe" not in directives["style-src"] and directives["frame-ancestors"] == "'none'"


def test_templates_have_no_inline_scripts_or_event_handlers_and_configure_htmx(client):
    import re
    from pathlib import Path

    for path in Path("templates").rglob("*.html"):
        text = path.read_text()
        for tag in re.findall(r"<script\b[^>]*>", text):
            assert "src=" in tag, f"{path}: inline script {tag}"
        assert not re.search(r"\son[a-z]+\s*=", text), f"{path}: inline event handler"
        assert "hx-on" not in text and "javascript:" not in text, path
    page = client.get(reverse("login")).content.decode()
    assert '"includeIndicatorStyles": false' in page


def test_sessions_last_a_working_day_not_two_weeks(client):
    make_user("operator", username="sam", password="Right-pw-123")
    _login(client, "sam", "Right-pw-123", address="10.6.0.1")
    assert 0 < int(client.cookies["sessionid"]["max-age"]) <= 8 * 3600


def test_https_setting_turns_on_secure_cookies_and_hsts_for_check_deploy():
    import base64
    import os

    from tests.console.test_settings import _check_deploy

    result = _check_deploy(
        {
            "SHARDVAULT_SECRET_KEY": "x" * 20 + base64.urlsafe_b64encode(os.urandom(40)).decode(),
            "SHARDVAULT_DATA_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "SHARDVAULT_HTTPS": "1",
            "SHARDVAULT_SSL_REDIRECT": "1",
            "SHARDVAULT_ALLOWED_HOSTS": "shardvault.example.internal",
        }
    )
    assert result.returncode == 0, result.stdout + result.stderr
