"""Signed webhooks delivered by an RQ job with retries, checked by a real HTTP receiver on
loopback: the X-ShardVault-Signature header is the HMAC-SHA256 of the exact body under
SHARDVAULT_WEBHOOK_SECRET, a 500 is retried, and neither the URL nor the secret is logged."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import threading

import pytest
from django.db import transaction

from backups.models import BackupPolicy, BackupSet
from backups.services.full_backups import backup_start
from backups.services.restore_run_states import restore_run_start
from backups.services.webhooks import webhook_event, webhook_retention_removed
from shards.models import Cluster, Instance
from tests.backups.test_restore_rules import file_request, make_backup
from tests.backups.test_restore_run import approve
from tests.factories import make_cluster, make_user
from tests.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "webhook-secret-7f3a"


class Receiver:
    """An HTTP server in a thread that answers each POST with the next planned status."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.received: list[tuple] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((self.headers, body))  # case-insensitive
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/sv?token=url-secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver([500])
    yield r
    r.close()


@pytest.fixture
def webhook_settings(settings):
    settings.SHARDVAULT_WEBHOOK_SECRET = SECRET
    settings.WEBHOOK_RETRY_SECONDS = [0, 0]
    return settings


def _signed_ok(headers, body: bytes) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("X-ShardVault-Signature", ""), expected)


def test_webhook_is_signed_and_retried_after_a_500(receiver, webhook_settings, run_jobs, caplog):
    cluster = Cluster.objects.create(name="hooked")
    BackupPolicy.objects.create(cluster=cluster, webhook_url=receiver.url)
    caplog.set_level(logging.DEBUG)
    with transaction.atomic():
        document = webhook_event(cluster, "rpo_breached", {"rpo_target_minutes": 60})
        assert receiver.received == []  # queued only once the transaction commits
    run_jobs("default")
    assert len(receiver.received) == 2  # the 500, then the retry that was accepted
    (first_headers, first_body), (headers, body) = receiver.received
    assert first_body == body and _signed_ok(headers, body) and _signed_ok(first_headers, body)
    sent = json.loads(body)
    assert sent == document
    assert sent["event"] == "rpo_breached" and sent["cluster"] == "hooked"
    assert headers["X-ShardVault-Event"] == "rpo_breached"
    tampered = body.replace(b"hooked", b"hacked")
    assert not _signed_ok(headers, tampered)
    logged = caplog.text
    assert "rpo_breached attempt 1: HTTP 500" in logged
    assert "rpo_breached attempt 2: delivered" in logged
    assert "127.0.0.1" not in logged and "url-secret" not in logged and SECRET not in logged


def test_webhook_gives_up_after_its_retries_without_naming_the_url(
    webhook_settings, run_jobs, caplog
):
    cluster = Cluster.objects.create(name="unreachable")
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    BackupPolicy.objects.create(cluster=cluster, webhook_url=url)
    caplog.set_level(logging.DEBUG)
    webhook_retention_removed(cluster, [{"set": 7, "reason": "older than keep_days"}])
    run_jobs("default")
    logged = caplog.text
    for attempt in (1, 2, 3):
        assert f"retention_removed attempt {attempt}: no answer" in logged
    assert "attempt 4" not in logged
    assert "nobody-listens" not in logged and str(url) not in logged


def test_a_failed_backup_reaches_the_webhook_signed(
    receiver, webhook_settings, run_jobs, mariadb_servers, unique_name
):
    cluster = make_cluster(mariadb_servers[:1], name=f"wh{unique_name}", tables={"t_user": 5})
    BackupPolicy.objects.update_or_create(
        cluster=cluster, defaults={"webhook_url": receiver.url, "verify_automatically": False}
    )
    Instance.objects.filter(cluster=cluster).update(port=free_port())  # nobody listens there
    backup_set = backup_start(cluster=cluster, actor=make_user("operator"))
    run_jobs("backups")
    run_jobs("default")
    backup_set = BackupSet.objects.get(pk=backup_set.pk)
    assert backup_set.status == "failed"
    assert len(receiver.received) == 2
    headers, body = receiver.received[-1]
    assert _signed_ok(headers, body)
    sent = json.loads(body)
    assert sent["event"] == "backup_failed" and sent["set"] == backup_set.pk
    assert sent["cluster"] == cluster.name and sent["error"]


def test_restore_requested_approved_and_succeeded_reach_the_webhook(
    receiver, webhook_settings, run_jobs, mariadb_servers, unique_name
):
    receiver.statuses = []  # every delivery accepted at once
    cluster = make_cluster(mariadb_servers[:1], name=f"wr{unique_name}", tables={"t_user": 5})
    BackupPolicy.objects.update_or_create(
        cluster=cluster, defaults={"webhook_url": receiver.url, "verify_automatically": False}
    )
    backup_set = make_backup(cluster, run_jobs)
    request = file_request(cluster, backup_set, target="side")
    approve(request)
    restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run_jobs("default")
    events = [json.loads(body) for _headers, body in receiver.received]
    assert all(_signed_ok(h, b) for h, b in receiver.received)
    assert [e["event"] for e in events] == [
        "restore_requested",
        "restore_approved",
        "restore_succeeded",
    ]
    assert {e["request"] for e in events} == {request.pk}
    assert events[1]["state"] == "approved" and events[2]["q"] == 1.0
    for shard in cluster.shards.select_related("instance"):
        server = next(s for s in mariadb_servers if s.endpoint.port == shard.instance.port)
        server.execute(f"DROP DATABASE IF EXISTS `{shard.database}__r{request.pk}`")
