"""Copies of sets on a second storage target, and reads that fall back to them.

Two targets: `default` (a local directory, STORAGE_URL) and `offsite` (S3 on moto's server).
Real MariaDB servers, a real backup and restore run by a real RQ worker.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import uuid
from io import StringIO
from pathlib import Path

import boto3
import pytest
from django.core import mail
from django.core.management import CommandError, call_command
from django.urls import reverse

from backups.engine.manifest import manifest_objects
from backups.models import BackupPolicy, Chunk, SetCopy
from backups.selectors.copies import set_copies_json
from backups.services.housekeeping import housekeeping_checks
from backups.services.restore_run_states import restore_run_start
from backups.services.sets import backup_set_expire, set_manifest, set_prefix
from backups.services.storage_targets import (
    set_all_targets,
    set_read_targets,
    storage_for_target,
    storage_target_add,
)
from console.models import AuditEvent
from tests.backups.test_restore_rules import file_request, make_backup
from tests.backups.test_restore_run import approve, checksum_of, shard_servers
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cluster(mariadb_servers, unique_name, settings):
    settings.BACKUP_CHUNK_ROWS = 200
    cluster = make_cluster(
        mariadb_servers[:2], name=f"cp{unique_name}", tables={"t_order": 700, "t_user": 40}
    )
    BackupPolicy.objects.update_or_create(
        cluster=cluster, defaults={"verify_automatically": False, "copy_to": ["offsite"]}
    )
    return cluster


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """A fresh bucket on moto's server (as tests/backups/test_storage.py's fixture)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"sv-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return {"url": s3_server.url, "bucket": bucket, "client": client}


@pytest.fixture
def offsite(s3_env):
    return storage_target_add(
        name="offsite",
        url=f"s3://{s3_env['bucket']}/copies",
        endpoint=s3_env["url"],
        user=make_user("admin"),
    )


@pytest.fixture
def copied(cluster, offsite, run_jobs):
    backup_set = make_backup(cluster, run_jobs)  # the copy job runs in the same burst
    copy = SetCopy.objects.get(backup_set=backup_set, target="offsite")
    assert copy.state == "complete", copy.error
    return backup_set


def _default_root(settings) -> Path:
    return Path(settings.STORAGE_URL.removeprefix("file://"))


def _chunk_keys(backup_set) -> list[str]:
    return list(
        Chunk.objects.filter(table_backup__shard_backup__backup_set=backup_set)
        .order_by("table_backup__shard_backup__shard_name", "table_backup__name", "index")
        .values_list("key", flat=True)
    )


def _verify(set_id, *args) -> tuple[int, dict, str]:
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command("verify", str(set_id), "--json", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, json.loads(out.getvalue()), err.getvalue()


def _restore_side(cluster, backup_set, run_jobs, mariadb_servers):
    expected = {
        shard.name: checksum_of(server, shard.database, "t_order")
        for shard, server in shard_servers(cluster, mariadb_servers)
    }
    request = file_request(cluster, backup_set, target="side")
    approve(request)
    run = restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert run.q == 1.0
    for shard, server in shard_servers(cluster, mariadb_servers):
        side = f"{shard.database}__r{request.pk}"
        assert checksum_of(server, side, "t_order") == expected[shard.name]
        server.execute(f"DROP DATABASE `{side}`")
    return run


def test_copy_is_complete_with_every_object_and_the_manifest_matching_sha256(
    copied, cluster, settings, tmp_path
):
    backup_set = copied
    copy = SetCopy.objects.get(backup_set=backup_set)
    doc = set_manifest(backup_set)
    objects = list(manifest_objects(doc))
    assert copy.objects_copied == len(objects) + 1  # and the manifest
    offsite = storage_for_target("offsite")
    for obj in objects:  # get_stream raises when size or sha256 differ
        data = offsite.get_bytes(
            obj["key"], expect_sha256=obj["sha256"], expect_size=obj["stored_bytes"]
        )
        assert len(data) == obj["stored_bytes"]
    manifest = f"{set_prefix(backup_set)}/manifest.json"
    assert offsite.get_bytes(manifest) == (_default_root(settings) / manifest).read_bytes()
    assert set_copies_json(backup_set) == [{"target": "offsite", "state": "complete"}]
    assert [name for name, _ in set_read_targets(backup_set)] == ["default", "offsite"]
    assert [name for name, _ in set_all_targets(backup_set)] == ["default", "offsite"]
    actions = set(
        AuditEvent.objects.filter(action__startswith="copy.").values_list("action", flat=True)
    )
    assert actions == {"copy.queued", "copy.start", "copy.complete"}
    code, result, _ = _verify(backup_set.pk, "--target", "offsite")
    assert code == 0 and result["q"] == 1.0 and result["target"] == "offsite"
    assert result["served_by"] == {"offsite": len(objects) + 1}

    # Reports carry A and Q per target.
    call_command("report", cluster.name, "--format", "json", "-o", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    (row,) = [s for s in report["sets"] if s["id"] == backup_set.pk]
    assert row["targets"][0] == {
        "target": "default",
        "copy_state": "complete",
        "a": None,
        "q": None,
        "checked_at": None,
    }
    assert (row["targets"][1]["target"], row["targets"][1]["copy_state"]) == (
        "offsite",
        "complete",
    )
    assert (row["targets"][1]["a"], row["targets"][1]["q"]) == (1.0, 1.0)


def test_flipped_byte_on_default_is_named_and_restore_succeeds_from_the_copy(
    copied, cluster, settings, run_jobs, mariadb_servers, client
):
    backup_set = copied
    key = _chunk_keys(backup_set)[0]
    path = _default_root(settings) / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    # The default target alone: A < 1, and the object is named.
    settings.ALERT_EMAILS = ["oncall@example.com"]
    code, only_default, err = _verify(backup_set.pk, "--target", "default")
    assert code == 1 and only_default["a"] < 1.0
    assert [p["object"] for p in only_default["problems"]] == [key]
    assert key in err
    (alert,) = [m for m in mail.outbox if "on storage target default" in m.subject]
    assert key in alert.body

    # With fallback: the object is read from the copy, named, and the set is whole.
    code, result, _ = _verify(backup_set.pk)
    assert code == 0 and result["q"] == 1.0
    (problem,) = result["problems"]
    assert problem["object"] == key and problem["target"] == "default"
    assert problem["served_by"] == "offsite" and "sha256" in problem["reason"]
    assert result["served_by"]["offsite"] == 1

    run = _restore_side(cluster, backup_set, run_jobs, mariadb_servers)
    assert run.served_by["objects"]["offsite"] == 1
    assert [(f["object"], f["target"], f["served_by"]) for f in run.served_by["fallbacks"]] == [
        (key, "default", "offsite")
    ]

    # The pages say which target served what.
    client.force_login(make_user("auditor"))
    page = client.get(reverse("backups:set_detail", args=[backup_set.pk])).content.decode()
    assert 'data-copy-state="complete"' in page
    assert f"{key}</span> on target default" in page and "read from target offsite" in page
    page = client.get(reverse("restores:request_detail", args=[run.request_id])).content.decode()
    assert "Read from storage targets: <strong>default</strong>" in page
    assert "<strong>offsite</strong> (1 objects)" in page


def test_default_objects_deleted_drill_and_restore_still_succeed(
    copied, cluster, settings, run_jobs, mariadb_servers
):
    backup_set = copied
    shutil.rmtree(_default_root(settings) / set_prefix(backup_set))

    code, drill, _ = _verify(backup_set.pk, "--drill")
    assert code == 0, drill
    assert drill["q"] == 1.0 and drill["drill"] is True
    assert set(drill["served_by"]) == {"offsite"}
    assert any(p.get("served_by") == "offsite" for p in drill["problems"])

    run = _restore_side(cluster, backup_set, run_jobs, mariadb_servers)
    assert set(run.served_by["objects"]) == {"offsite"}


class FlakyProxy:
    """A TCP forwarder to moto's server that dies after `requests` HTTP requests: it closes
    every connection and refuses new ones, like an S3 endpoint lost half-way."""

    def __init__(self, upstream_port: int, requests: int):
        self.upstream_port = upstream_port
        self.remaining = requests
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.dead = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(65536):
                if count:
                    with self.lock:
                        self.remaining -= data.count(b" HTTP/1.1\r\n")
                        over = self.remaining < 0
                    if over:
                        self.kill()
                        return
                sink.sendall(data)
        except OSError:
            return

    def kill(self) -> None:
        with self.lock:
            self.dead = True
            sockets, self.sockets = self.sockets, []
        self.listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_copy_to_an_s3_server_lost_half_way_is_retried_then_alerts(
    cluster, s3_env, s3_server, settings, run_jobs
):
    settings.COPY_RETRY_SECONDS = [0, 0]  # RQ retries at once here; production backs off
    settings.ALERT_EMAILS = ["oncall@example.com"]
    proxy = FlakyProxy(s3_server.port, requests=5)
    storage_target_add(
        name="offsite",
        url=f"s3://{s3_env['bucket']}/copies",
        endpoint=proxy.url,
        options={"max_attempts": "1"},
        user=make_user("admin"),
    )
    try:
        backup_set = make_backup(cluster, run_jobs)
    finally:
        proxy.kill()
    assert proxy.dead
    copy = SetCopy.objects.get(backup_set=backup_set, target="offsite")
    assert (copy.state, copy.attempts) == ("failed", 3)
    assert copy.error
    backup_set.refresh_from_db()
    assert backup_set.status == "succeeded"  # a failed copy never fails the set
    # Some objects reached the target before it was lost: the copy really failed half-way.
    listed = s3_env["client"].list_objects_v2(Bucket=s3_env["bucket"], Prefix="copies/")
    assert 0 < listed.get("KeyCount", 0)
    assert not any(o["Key"].endswith("manifest.json") for o in listed.get("Contents", []))
    actions = list(
        AuditEvent.objects.filter(action__in=["copy.retry", "copy.fail"])
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["copy.retry", "copy.retry", "copy.fail"]
    (alert,) = [m for m in mail.outbox if "copy" in m.subject]
    assert alert.subject.endswith(
        f"copy of backup set {backup_set.pk} of {cluster.name} to offsite failed"
    )
    assert alert.to == ["oncall@example.com"]
    assert set_copies_json(backup_set) == [{"target": "offsite", "state": "failed"}]
    # Reads never use a failed copy.
    assert [name for name, _ in set_read_targets(backup_set)] == ["default"]


def test_copy_left_copying_by_a_dead_worker_is_queued_again_by_housekeeping(
    copied, s3_env, run_jobs
):
    backup_set = copied
    SetCopy.objects.filter(backup_set=backup_set).update(state="copying")  # the worker died
    listed = s3_env["client"].list_objects_v2(Bucket=s3_env["bucket"], Prefix="copies/")
    for item in listed["Contents"]:
        s3_env["client"].delete_object(Bucket=s3_env["bucket"], Key=item["Key"])
    assert [name for name, _ in set_read_targets(backup_set)] == ["default"]
    result = housekeeping_checks()
    assert result["copies_requeued"] == [f"copy-{backup_set.pk}-offsite"]
    assert housekeeping_checks()["copies_requeued"] == []  # queued once, not twice
    run_jobs("backups")
    copy = SetCopy.objects.get(backup_set=backup_set)
    assert (copy.state, copy.attempts) == ("complete", 2)
    code, result, _ = _verify(backup_set.pk, "--target", "offsite")
    assert code == 0 and result["q"] == 1.0


def test_expiring_a_set_removes_every_copy(copied, s3_env, settings):
    backup_set = copied
    backup_set_expire(backup_set=backup_set, actor=make_user("operator"))
    listed = s3_env["client"].list_objects_v2(Bucket=s3_env["bucket"], Prefix="copies/")
    assert listed.get("KeyCount", 0) == 0
    root = _default_root(settings) / set_prefix(backup_set)
    assert not any(p.is_file() for p in root.rglob("*"))


def test_verify_target_refuses_unknown_targets_and_sets_without_a_copy(copied, tmp_path):
    backup_set = copied
    with pytest.raises(CommandError, match="no storage target named nowhere"):
        call_command("verify", str(backup_set.pk), "--target", "nowhere")
    storage_target_add(name="spare", url=f"file://{tmp_path}", user=make_user("admin"))
    with pytest.raises(
        CommandError, match=f"set {backup_set.pk} has no copy on storage target spare"
    ):
        call_command("verify", str(backup_set.pk), "--target", "spare")


def test_point_in_time_restore_reads_full_and_binlog_from_the_copy(
    cluster, offsite, settings, run_jobs, mariadb_servers
):
    from datetime import UTC, datetime

    from backups.services.full_backups import backup_start
    from backups.services.restore_requests import restore_request_approve, restore_request_file
    from tests.backups.test_pitr import next_second

    full = make_backup(cluster, run_jobs)
    for shard, server in shard_servers(cluster, mariadb_servers):
        server.execute(
            "UPDATE t_order SET note = 'after the full' WHERE id % 5 = 0",
            "DELETE FROM t_order WHERE id > 650",
            database=shard.database,
        )
    expected = {
        shard.name: checksum_of(server, shard.database, "t_order")
        for shard, server in shard_servers(cluster, mariadb_servers)
    }
    next_second()
    at = datetime.now(UTC).replace(microsecond=0)
    next_second()
    incremental = backup_start(cluster=cluster, actor=make_user("operator"), kind="incremental")
    run_jobs("backups")
    incremental.refresh_from_db()
    assert incremental.status == "succeeded", incremental.error
    states = dict(SetCopy.objects.filter(target="offsite").values_list("backup_set_id", "state"))
    assert states == {full.pk: "complete", incremental.pk: "complete"}
    for backup_set in (full, incremental):  # the default target loses both sets
        shutil.rmtree(_default_root(settings) / set_prefix(backup_set))

    request = restore_request_file(
        cluster=cluster, requester=make_user("operator"), at=at, target="side", reason="pitr"
    )
    restore_request_approve(request=request, approver=make_user("approver"))
    run = restore_run_start(request=request, actor=make_user("operator"))
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert set(run.served_by["objects"]) == {"offsite"}
    # The binlog segments fell back too, and the run counts them with the rest.
    segments = set(incremental.segments.values_list("key", flat=True))
    assert segments
    chunks = set(_chunk_keys(full))
    # The full's manifest and chunks, then every segment, all from the copy. Reads are
    # counted, not objects: a chunk whose parallel load deadlocked is read and loaded again
    # (engine/load.py), which a loaded machine sometimes shows as one read more.
    assert run.served_by["objects"]["offsite"] >= 1 + len(chunks) + len(segments)
    fell_back = [f["object"] for f in run.served_by["fallbacks"]]
    assert fell_back.count(f"{set_prefix(incremental)}/manifest.json") == 1
    for shard, server in shard_servers(cluster, mariadb_servers):
        side = f"{shard.database}__r{request.pk}"
        assert checksum_of(server, side, "t_order") == expected[shard.name]
        server.execute(f"DROP DATABASE `{side}`")
