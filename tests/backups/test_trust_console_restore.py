"""Issue 12, console side of restores: approvals expire on time, bind the server they were
given for, and a run restores only the manifest of its own set. Real servers and storage."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta

import pytest
from django.utils import timezone

from backups.models import RestoreRequest, RestoreRun
from backups.services.errors import RestoreError
from backups.services.restore_requests import restore_request_approve, restore_requests_expire
from backups.services.restore_run_states import restore_run_start
from console.keys import encrypt_secret
from console.models import AuditEvent
from shards.models import Instance
from tests.backups.test_restore_rules import file_request, make_backup, server_for
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"tc{unique_name}")


@pytest.fixture
def backup_set(cluster, run_jobs):
    return make_backup(cluster, run_jobs)


def _side_databases(cluster, request, servers) -> list[str]:
    found = []
    for shard in cluster.shards.select_related("instance"):
        side = f"{shard.database}__r{request.pk}"
        server = server_for(servers, shard.instance)
        if server.execute(
            f"SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{side}'"
        ):
            found.append(side)
    return found


# ---- 6: an approval lapses 24 h after it was given unless a run has begun -------------------


def test_approval_with_only_a_queued_run_expires_in_housekeeping(cluster, backup_set, settings):
    request = file_request(cluster, backup_set)
    restore_request_approve(request=request, approver=make_user("approver"))
    run = restore_run_start(request=request, actor=make_user("operator"))
    later = timezone.now() + timedelta(hours=settings.RESTORE_APPROVAL_TTL_HOURS + 1)
    assert restore_requests_expire(now=later) == 1
    request.refresh_from_db()
    run.refresh_from_db()
    assert request.state == "expired" and run.started_at is None


def test_run_queued_in_time_but_begun_after_the_approval_lapsed_is_refused(
    cluster, backup_set, run_jobs, mariadb_servers
):
    request = file_request(cluster, backup_set)
    restore_request_approve(request=request, approver=make_user("approver"))
    run = restore_run_start(request=request, actor=make_user("operator"))
    # The run was queued 25 h ago, and the approval lapsed an hour ago; the worker only now
    # picks the job up.
    now = timezone.now()
    RestoreRun.objects.filter(pk=run.pk).update(created_at=now - timedelta(hours=25))
    RestoreRequest.objects.filter(pk=request.pk).update(expires_at=now - timedelta(hours=1))
    run_jobs("restores")
    request.refresh_from_db()
    run.refresh_from_db()
    assert request.state == "expired"
    assert run.started_at is None and run.status == "pending"
    assert AuditEvent.objects.filter(action="restore.expired", object_id=str(request.pk)).exists()
    assert _side_databases(cluster, request, mariadb_servers) == []


# ---- 3: an approval covers the server it was given for --------------------------------------


class SwitchableProxy:
    """A TCP forwarder on 127.0.0.1 whose backend can be switched: another server behind
    the same address, as a re-pointed DNS name or load balancer would put there."""

    def __init__(self, backend_port: int):
        self.backend_port = backend_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            backend = socket.create_connection(("127.0.0.1", self.backend_port))
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._listener.close()


def _register(cluster, name: str, server, *, host: str = "127.0.0.1", port: int | None = None):
    return Instance.objects.create(
        cluster=cluster,
        name=name,
        host=host,
        port=port or server.endpoint.port,
        user=server.endpoint.user,
        password_encrypted=encrypt_secret(server.endpoint.password),
    )


def _approved_run(cluster, backup_set, target="side"):
    request = file_request(cluster, backup_set, target=target)
    restore_request_approve(request=request, approver=make_user("approver"))
    run = restore_run_start(request=request, actor=make_user("operator"))
    return request, run


def test_plan_records_each_target_address_user_and_server_identity(cluster, backup_set):
    request = file_request(cluster, backup_set)
    targets = {t["instance"]: t for t in request.plan["targets"]}
    assert set(targets) == set(cluster.instances.values_list("name", flat=True))
    for instance in cluster.instances.all():
        recorded = targets[instance.name]
        assert (recorded["host"], recorded["port"], recorded["user"]) == (
            instance.host, instance.port, instance.user,
        )  # fmt: skip
        assert (
            recorded["identity"].startswith("mariadb:")
            and str(instance.port) in recorded["identity"]
        )


def test_re_pointing_an_approved_target_refuses_the_run(
    cluster, backup_set, run_jobs, mariadb_servers
):
    request, run = _approved_run(cluster, backup_set)
    other = mariadb_servers[2]
    moved = cluster.instances.get(name=mariadb_servers[0].name)
    moved.port = other.endpoint.port
    moved.save(update_fields=["port"])
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "failed"
    assert f"target instance {moved.name} was changed from" in run.error
    assert "file a new request" in run.error and "\n" not in run.error
    assert _side_databases(cluster, request, mariadb_servers) == []


def test_another_server_behind_the_approved_address_refuses_the_run(
    mariadb_servers, unique_name, run_jobs
):
    source, first, second = mariadb_servers
    cluster = make_cluster([source], name=f"tp{unique_name}")
    backup_set = make_backup(cluster, run_jobs)
    proxy = SwitchableProxy(first.endpoint.port)
    try:
        _register(cluster, "dr", first, port=proxy.port)
        request, run = _approved_run(cluster, backup_set, target="instance:dr")
        [recorded] = request.plan["targets"]
        assert recorded["port"] == proxy.port and str(first.endpoint.port) in recorded["identity"]
        proxy.backend_port = second.endpoint.port  # same host and port, another server
        run_jobs("restores")
    finally:
        proxy.close()
    run.refresh_from_db()
    assert run.status == "failed"
    assert "target instance dr" in run.error and "is now a different server" in run.error
    database = cluster.shards.get().database
    for server in (first, second):
        assert not server.execute(
            f"SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{database}'"
        )


def test_the_approved_server_still_restores(cluster, backup_set, run_jobs, mariadb_servers):
    request, run = _approved_run(cluster, backup_set)
    run_jobs("restores")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert len(_side_databases(cluster, request, mariadb_servers)) == cluster.shards.count()
    for side in _side_databases(cluster, request, mariadb_servers):
        for server in mariadb_servers:
            server.execute(f"DROP DATABASE IF EXISTS `{side}`")


def test_same_server_under_another_name_is_recognised_as_the_source(
    mariadb_servers, unique_name, run_jobs
):
    source = mariadb_servers[0]
    cluster = make_cluster([source], name=f"ts{unique_name}")
    backup_set = make_backup(cluster, run_jobs)
    # `localhost` and `127.0.0.1` differ as text; the server says it is the same one.
    _register(cluster, "alias", source, host="localhost")
    with pytest.raises(RestoreError, match="holds the source database"):
        file_request(cluster, backup_set, target="instance:alias")


# ---- 8: a manifest vouches only for its own set --------------------------------------------


def _put_manifest(backup_set, data: bytes) -> None:
    from backups.engine.manifest import manifest_key
    from backups.services.sets import set_prefix, set_storage

    set_storage(backup_set).put_bytes(manifest_key(set_prefix(backup_set)), data)


def _manifest_bytes(backup_set) -> bytes:
    from backups.engine.manifest import manifest_key
    from backups.services.sets import set_prefix, set_storage

    return set_storage(backup_set).get_bytes(manifest_key(set_prefix(backup_set)))


def test_another_sets_signed_manifest_is_refused_by_restore_verify_and_drill(
    cluster, backup_set, run_jobs
):
    from backups.services.verification import verification_run_now

    other = make_backup(cluster, run_jobs)
    _put_manifest(backup_set, _manifest_bytes(other))  # validly signed, but set `other`'s
    with pytest.raises(RestoreError) as refused:
        file_request(cluster, backup_set)
    message = str(refused.value)
    assert f"set {other.pk} of cluster" in message and f"not of set {backup_set.pk}" in message
    for drill in (False, True):
        check = verification_run_now(backup_set=backup_set, drill=drill)
        assert check.q == 0.0 and check.a == 0.0
        assert any(f"not of set {backup_set.pk}" in p["reason"] for p in check.problems)


def test_a_re_signed_manifest_of_the_same_set_is_refused_by_its_recorded_sha256(
    cluster, backup_set
):
    import json

    from backups.engine.manifest import manifest_sign
    from console.keys import manifest_hmac_key

    doc = json.loads(_manifest_bytes(backup_set))
    doc["shards"] = doc["shards"][:1]  # one shard fewer, signed with the real key
    _put_manifest(backup_set, json.dumps(manifest_sign(doc, manifest_hmac_key())).encode())
    with pytest.raises(RestoreError, match="sha256 mismatch"):
        file_request(cluster, backup_set)


# ---- 3, against a fake server: what the identity is, and a server that will not say -------


def test_server_identity_is_mysqls_server_uuid_or_mariadbs_own_description(
    fake_mysql, mariadb_servers
):
    from backups.engine.identity import server_identity
    from backups.engine.mysql import Endpoint

    fake = fake_mysql(answers={"server_uuid": [("3e11fa47-71ca-11e1-9e33-c80aa9429562",)]})
    endpoint = Endpoint(name="fake", host=fake.host, port=fake.port, user="u")
    assert server_identity(endpoint) == "mysql:3e11fa47-71ca-11e1-9e33-c80aa9429562"
    real = mariadb_servers[1]
    assert server_identity(real.endpoint) == server_identity(real.endpoint)
    assert server_identity(real.endpoint) != server_identity(mariadb_servers[2].endpoint)
    assert f":{real.endpoint.port}:" in server_identity(real.endpoint)


def test_a_target_that_will_not_say_which_server_it_is_is_refused_in_one_sentence(
    fake_mysql, mariadb_servers, unique_name, run_jobs
):
    source = mariadb_servers[0]
    cluster = make_cluster([source], name=f"tf{unique_name}")
    backup_set = make_backup(cluster, run_jobs)
    fake = fake_mysql(queries="empty")
    Instance.objects.create(
        cluster=cluster, name="odd", host=fake.host, port=fake.port, user="u",
        password_encrypted=encrypt_secret(""),
    )  # fmt: skip
    with pytest.raises(RestoreError) as refused:
        file_request(cluster, backup_set, target="instance:odd")
    message = str(refused.value)
    assert "target instance odd" in message and "did not say which server it is" in message
    assert "\n" not in message


def test_starting_the_run_of_a_re_pointed_target_is_refused_at_once(
    cluster, backup_set, mariadb_servers
):
    request = file_request(cluster, backup_set)
    restore_request_approve(request=request, approver=make_user("approver"))
    moved = cluster.instances.get(name=mariadb_servers[1].name)
    moved.user = "someone_else"
    moved.save(update_fields=["user"])
    with pytest.raises(RestoreError, match=f"target instance {moved.name} was changed from"):
        restore_run_start(request=request, actor=make_user("operator"))
    assert not RestoreRun.objects.filter(request=request).exists()


def test_approvers_see_which_servers_their_approval_covers(client, cluster, backup_set):
    from django.urls import reverse

    request = file_request(cluster, backup_set)
    client.force_login(make_user("approver"))
    page = client.get(reverse("restores:request_detail", args=[request.pk])).content.decode()
    assert "Approval covers only these servers" in page
    for target in request.plan["targets"]:
        assert f"{target['user']}@{target['host']}:{target['port']}" in page
        assert target["identity"] in page
