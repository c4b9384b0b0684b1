"""`manage.py users create`: provisioning people from scripts."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import CommandError, call_command
from django.db import connection

from console.models import AuditEvent
from console.roles import ROLES, user_roles

pytestmark = pytest.mark.django_db


def _create(*args: str, stdin: str | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out = io.StringIO()
    call_command("users", "create", *args, stdout=out)
    return out.getvalue()


def test_create_with_password_from_stdin_can_log_in(client, monkeypatch):
    out = _create(
        "carol",
        "--role",
        "approver",
        "--email",
        "c@example.test",
        "--password-stdin",
        stdin="Long-enough-pw-1\n",
        monkeypatch=monkeypatch,
    )
    assert "created user carol with role approver" in out
    user = User.objects.get(username="carol")
    assert user.email == "c@example.test" and user_roles(user) == {"approver"}
    assert client.login(username="carol", password="Long-enough-pw-1")
    assert AuditEvent.objects.filter(action="user.create", object_repr="carol").exists()


def test_create_without_password_makes_a_user_who_cannot_log_in_yet(client):
    _create("dave", "--role", "auditor")
    assert not User.objects.get(username="dave").has_usable_password()


def test_taken_username_and_weak_password_are_refused(monkeypatch):
    _create("erin", "--role", "operator")
    with pytest.raises(CommandError, match="user 'erin' already exists"):
        _create("erin", "--role", "operator")
    with pytest.raises(CommandError, match="password refused"):
        _create(
            "frank",
            "--role",
            "operator",
            "--password-stdin",
            stdin="123\n",
            monkeypatch=monkeypatch,
        )
    assert not User.objects.filter(username="frank").exists()


@pytest.mark.django_db(transaction=True)
def test_unknown_role_is_one_line_on_stderr(tmp_path, settings, redis_url):
    # Transactional tests flush the groups the data migration made; put them back.
    for role in ROLES:
        Group.objects.get_or_create(name=role)
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
        "SHARDVAULT_DATA_KEY": settings.SHARDVAULT_DATA_KEY,
        "REDIS_URL": redis_url,
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "users", "create", "gina", "--role", "boss"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode != 0
    assert "invalid choice: 'boss'" in result.stderr and "Traceback" not in result.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "users",
            "create",
            "gina",
            "--role",
            "admin",
            "--password-stdin",
        ],
        input="Gina-admin-pw-9\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert user_roles(User.objects.get(username="gina")) == {"admin"}
