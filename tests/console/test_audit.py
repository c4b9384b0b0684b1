"""The audit log: tamper evidence by `audit verify` and the page, filters, CSV export, roles."""

from __future__ import annotations

import csv
import io
import re
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from backups.models import VerificationRun
from console.audit import audit_record
from console.models import AuditEvent
from tests.factories import make_user

pytestmark = pytest.mark.django_db


def _audit_verify():
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command("audit", "verify", stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def events():
    alice = make_user("operator", "alice")
    made = [
        audit_record(actor=alice, action="backup.start", object_type="backups.backupset", object_id="7", object_repr="set 7"),
        audit_record(actor="worker", action="backup.finish", object_type="backups.backupset", object_id="7", object_repr="set 7", details={"status": "succeeded"}),
        audit_record(actor=alice, action="restore.request", object_type="backups.restorerequest", object_id="3", object_repr="restore request 3"),
        audit_record(actor="bob", action="restore.approve", object_type="backups.restorerequest", object_id="3", details={"comment": "ok"}),
    ]  # fmt: skip
    return made


def test_audit_verify_passes_on_an_intact_chain(events):
    code, out, _ = _audit_verify()
    assert code == 0
    assert "intact" in out and events[-1].hash in out


def test_raw_sql_tampering_is_named_by_audit_verify_and_the_page(events, client):
    victim = events[1]
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE console_auditevent SET details = %s WHERE id = %s",
            ['{"status": "failed"}', victim.pk],
        )
    code, out, err = _audit_verify()
    assert code != 0
    assert f"#{victim.pk}" in err and "broken" in err
    assert err.count("\n") <= 1 and "Traceback" not in err

    client.force_login(make_user("auditor"))
    page = client.get(reverse("audit_log")).content.decode()
    assert "Chain broken" in page and f"<strong>#{victim.pk}</strong>" in page


def test_deleting_a_row_by_raw_sql_breaks_the_chain_at_the_next_event(events):
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM console_auditevent WHERE id = %s", [events[1].pk])
    code, _, err = _audit_verify()
    assert code != 0 and f"#{events[2].pk}" in err


def test_orm_refuses_update_and_delete(events):
    with pytest.raises(PermissionError):
        AuditEvent.objects.filter(pk=events[0].pk).update(action="x")
    with pytest.raises(PermissionError):
        AuditEvent.objects.all().delete()
    with pytest.raises(PermissionError):
        events[0].save()


def test_page_filters_by_actor_action_object_and_time(events, client):
    client.force_login(make_user("auditor"))
    url = reverse("audit_log")

    def shown(**params):
        page = client.get(url, params).content.decode()
        return {e.pk for e in events if f'data-event="{e.pk}"' in page}

    assert shown() == {e.pk for e in events}
    assert shown(actor="alice") == {events[0].pk, events[2].pk}
    assert shown(action="restore.") == {events[2].pk, events[3].pk}
    assert shown(object="backups.backupset:7") == {events[0].pk, events[1].pk}
    assert shown(object="restore request 3") == {events[2].pk}
    assert shown(since="2000-01-01", until="2000-01-02") == set()
    today = events[0].at.date().isoformat()
    assert shown(since=today, until=today) == {e.pk for e in events}
    assert "is not a date" in client.get(url, {"since": "soon"}).content.decode()


def test_page_is_paginated(client):
    for n in range(60):
        audit_record(actor="worker", action="test.event", object_id=str(n))
    client.force_login(make_user("auditor"))  # creating a user is audited too: filter on action
    first = client.get(reverse("audit_log"), {"action": "test.event"}).content.decode()
    assert "Page 1 of 2" in first and first.count('data-event="') == 50
    second = client.get(reverse("audit_log"), {"action": "test.event", "page": 2}).content.decode()
    assert second.count('data-event="') == 10


def test_csv_export_streams_filtered_events_with_hashes(events, client):
    client.force_login(make_user("auditor"))
    response = client.get(reverse("audit_export"), {"actor": "alice"})
    assert response.status_code == 200 and response.streaming
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [int(r["id"]) for r in rows] == [events[0].pk, events[2].pk]
    assert rows[0]["hash"] == events[0].hash and rows[0]["actor"] == "alice"


@pytest.mark.parametrize("role", ["operator", "approver", None])
def test_only_auditors_and_admins_see_the_audit_log(events, client, role):
    client.force_login(make_user(role))
    assert client.get(reverse("audit_log")).status_code == 403
    assert client.get(reverse("audit_export")).status_code == 403


def test_admin_sees_the_audit_log(events, client):
    client.force_login(make_user("admin"))
    assert client.get(reverse("audit_log")).status_code == 200


def _all_routes():
    def walk(patterns, prefix=""):
        for p in patterns:
            if isinstance(p, URLResolver):
                if str(p.pattern).startswith("admin/"):
                    continue
                yield from walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                yield prefix + str(p.pattern), p

    return list(walk(get_resolver().url_patterns))


def test_auditor_gets_403_on_every_write_view(client, events):
    """POST to every route (ids filled with 1): an auditor is refused and nothing changes.

    A 404 (the view looked the object up first) is accepted only because the audit log,
    which every state change writes to, stays untouched."""
    client.force_login(make_user("auditor"))
    allowed = {"login/", "logout/"}
    checked = []
    before = AuditEvent.objects.count()
    for route, _pattern in _all_routes():
        if route in allowed:
            continue
        url = "/" + re.sub(
            r"<(?:\w+:)?(\w+)>", lambda m: "1" if "slug" not in m.group(0) else "x", route
        )
        status = client.post(url, {"drill": "1", "comment": "x", "reason": "x"}).status_code
        assert status in (403, 404, 405), f"POST {url} gave {status} to an auditor"
        checked.append(url)
    assert "/backups/1/verify/" in checked
    assert not VerificationRun.objects.exists()
    assert AuditEvent.objects.count() == before
