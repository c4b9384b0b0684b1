"""`manage.py storage add|list`, the storage target service and the admin page."""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from backups.models import StorageTarget
from backups.services.storage_targets import (
    StorageTargetError,
    storage_for_target,
    storage_target_add,
    storage_target_names,
)
from backups.storage.local import LocalStorage
from backups.storage.s3 import S3Storage
from console.models import AuditEvent
from console.roles import RoleDenied
from tests.factories import make_user

pytestmark = pytest.mark.django_db


def _storage(*args) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("storage", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        return exc.code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def test_list_always_shows_default_as_storage_url(settings):
    code, out, _ = _storage("list", "--json")
    assert code == 0
    assert json.loads(out)["targets"] == [
        {"name": "default", "url": settings.STORAGE_URL, "default": True, "endpoint": ""}
    ]
    assert storage_target_names() == {"default"}


def test_add_then_list_shows_both_and_is_audited(tmp_path, settings):
    admin = make_user("admin")
    code, out, _ = _storage(
        "add", "offsite", f"file://{tmp_path / 'offsite'}", "--as", admin.username, "--json"
    )
    assert code == 0
    assert json.loads(out) == {
        "name": "offsite",
        "url": f"file://{tmp_path / 'offsite'}",
        "default": False,
        "error": "",
    }
    code, out, _ = _storage(
        "add",
        "s3copy",
        "s3://bucket/backups",
        "--endpoint",
        "http://127.0.0.1:9",
        "--option",
        "storage_class=STANDARD_IA",
        "--option",
        "sse=AES256",
        "--as",
        admin.username,
    )
    assert code == 0 and "s3copy" in out
    targets = json.loads(_storage("list", "--json")[1])["targets"]
    assert [(t["name"], t["default"]) for t in targets] == [
        ("default", True),
        ("offsite", False),
        ("s3copy", False),
    ]
    assert storage_target_names() == {"default", "offsite", "s3copy"}
    assert isinstance(storage_for_target("offsite"), LocalStorage)
    s3 = storage_for_target("s3copy")
    assert isinstance(s3, S3Storage)
    assert (s3.storage_class, s3.server_side_encryption) == ("STANDARD_IA", "AES256")
    assert s3.endpoint_url == "http://127.0.0.1:9"
    event = AuditEvent.objects.filter(action="storage.target_add").order_by("id").first()
    assert event.details["name"] == "offsite"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Bad Name", "file:///tmp/x"], "lowercase letters"),
        (["default", "file:///tmp/x"], "STORAGE_URL"),
        (["ftp1", "ftp://host/x"], "not supported"),
        (["rel", "file://relative/x"], "file:///absolute/path"),
        (["creds", "s3://AKIA:secret@bucket/x"], "must not carry credentials"),
        (["opt", "s3://bucket/x", "--option", "colour=blue"], "unknown storage option"),
        (["ep", "s3://bucket/x", "--endpoint", "ftp://127.0.0.1"], "http:// or https://"),
    ],
)
def test_add_refuses_bad_input_with_one_line(args, message):
    admin = make_user("admin")
    with pytest.raises(Exception) as caught:
        call_command("storage", "add", *args, "--as", admin.username)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "secret" not in str(caught.value)
    assert not StorageTarget.objects.exists()


def test_add_with_json_prints_the_error_as_json_too(tmp_path):
    admin = make_user("admin")
    out = StringIO()
    with pytest.raises(CommandError, match="not supported"):
        call_command(
            "storage", "add", "x", "gopher://h/x", "--as", admin.username, "--json", stdout=out
        )
    answer = json.loads(out.getvalue())
    assert answer["name"] == "x" and "not supported" in answer["error"]


def test_add_refuses_duplicates_and_non_admins(tmp_path):
    admin = make_user("admin")
    storage_target_add(name="offsite", url=f"file://{tmp_path}", user=admin)
    with pytest.raises(StorageTargetError, match="already exists"):
        storage_target_add(name="offsite", url=f"file://{tmp_path}/2", user=admin)
    with pytest.raises(RoleDenied):
        storage_target_add(name="other", url=f"file://{tmp_path}/3", user=make_user("operator"))
    assert StorageTarget.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_cli_errors_exit_non_zero_with_one_line_and_no_traceback(tmp_path):
    from django.db import connection

    make_user("admin", username="root-admin")
    env = {
        "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
        "PATH": "/usr/bin:/bin",
    }
    base = [sys.executable, "manage.py", "storage"]
    done = subprocess.run(
        [*base, "add", "x", "gopher://h/x", "--as", "root-admin"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not supported" in lines[0]
    assert "Traceback" not in done.stderr
    done = subprocess.run(
        [*base, "add", "x", f"file://{tmp_path}", "--as", "nobody"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "no active user" in done.stderr


def test_admin_page_lists_and_adds_targets(client, tmp_path, settings):
    admin = make_user("admin")
    client.force_login(admin)
    url = reverse("backups:storage_targets")
    page = client.get(url)
    assert page.status_code == 200
    assert b"default" in page.content
    answer = client.post(url, {"name": "offsite", "url": f"file://{tmp_path}", "endpoint": ""})
    assert answer.status_code in (200, 302)
    assert StorageTarget.objects.filter(name="offsite").exists()
    assert b"offsite" in client.get(url).content
    answer = client.post(url, {"name": "offsite", "url": f"file://{tmp_path}", "endpoint": ""})
    assert b"already exists" in answer.content


def test_admin_page_is_for_admins_only(client, tmp_path):
    client.force_login(make_user("operator"))
    url = reverse("backups:storage_targets")
    assert client.get(url).status_code == 403
    assert client.post(url, {"name": "x", "url": f"file://{tmp_path}"}).status_code == 403
    assert not StorageTarget.objects.exists()
