"""Topology pages: lists without N+1, forms with inline errors, test connection, discovery job, import."""

from __future__ import annotations

import base64
import os

import pytest
from django.contrib.auth.models import Group
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.template.defaultfilters import filesizeformat
from django.test import Client
from django.urls import reverse

from backups.engine.mysql import quote_ident
from console.models import AuditEvent
from console.roles import RoleDenied
from shards.models import Cluster, DiscoveryRun, Instance, PhysicalTable, Shard
from shards.selectors import instance_endpoint
from shards.services.discovery_runs import discovery_request, discovery_run
from shards.services.topology import cluster_create, instance_create, shard_create
from shards.services.topology_import import topology_import
from shards.topology_file import parse_topology
from tests.factories import make_cluster, make_user
from tests.servers import free_port

pytestmark = pytest.mark.django_db

HX = {"HTTP_HX_REQUEST": "true"}


def _field_errors(html: str, field: str) -> str:
    """The error list the form shows beside one field ("" when it has none)."""
    start = html.find(f'id="errors-{field}"')
    return "" if start < 0 else html[start : html.index("</ul>", start)]


@pytest.fixture
def operator_client(client):
    client.force_login(make_user("operator"))
    return client


@pytest.fixture
def cluster(mariadb_servers, unique_name):
    return make_cluster(mariadb_servers[:2], name=f"pg{unique_name}")


def test_cluster_list_shows_counts_size_and_worst_finding_in_constant_queries(
    operator_client, cluster, django_assert_max_num_queries
):
    discovery_run(cluster=cluster, actor="test")
    for n in range(5):
        extra = Cluster.objects.create(name=f"extra{n}")
        Instance.objects.create(cluster=extra, name="i", host="127.0.0.1", user="u")
    with django_assert_max_num_queries(8):
        response = operator_client.get(reverse("shards:cluster_list"))
    html = response.content.decode()
    total = sum(t.total_bytes for t in PhysicalTable.objects.filter(shard__cluster=cluster))
    assert total > 0
    row = html.split(f'data-cluster="{cluster.name}"')[1].split("</tr>")[0]
    assert ">2</td>" in row  # two shards, two instances
    assert "sev-ok" in row
    assert (
        str(filesizeformat(total)).replace("\xa0", "&nbsp;") in row
        or str(filesizeformat(total)) in row
    )
    assert "not discovered" in html.split('data-cluster="extra0"')[1].split("</tr>")[0]


def test_cluster_detail_groups_shards_by_instance_with_tables_and_findings(
    operator_client, cluster, mariadb_servers
):
    mariadb_servers[0].execute(
        f"CREATE TABLE {quote_ident(cluster.shards.get(name='s00').database)}.nopk (a INT) ENGINE=MyISAM"
    )
    discovery_run(cluster=cluster, actor="test")
    html = operator_client.get(
        reverse("shards:cluster_detail", args=[cluster.name])
    ).content.decode()
    first, second = (s.name for s in mariadb_servers[:2])
    m0 = html.split(f'data-instance="{first}"')[1].split(f'data-instance="{second}"')[0]
    assert 'data-shard="s00"' in m0 and 'data-shard="s01"' not in m0
    assert 'data-table="t_order"' in m0 and 'data-table="nopk"' in m0
    assert "has no primary key" in html and "MyISAM" in html


def test_instance_form_rejects_bad_port_and_duplicate_name_inline(operator_client, cluster):
    url = reverse("shards:instance_create", args=[cluster.name])
    data = {
        "name": "m9",
        "host": "127.0.0.1",
        "port": "70000",
        "user": "root",
        "max_connections": "4",
    }
    response = operator_client.post(url, data, **HX)
    html = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in html and 'id="object-form"' in html  # only the form partial
    assert "The port is out of range: use 1 to 65535." in html
    taken = cluster.instances.first().name
    response = operator_client.post(url, {**data, "name": taken, "port": "3306"}, **HX)
    assert (
        f"cluster {cluster.name} already has an instance named &#x27;{taken}&#x27;"
        in response.content.decode()
    )
    assert cluster.instances.count() == 2


def test_adding_an_instance_stores_the_password_encrypted_and_never_shows_it(
    operator_client, cluster
):
    url = reverse("shards:instance_create", args=[cluster.name])
    secret = "Very-Secret-Pw-42"
    data = {
        "name": "m9",
        "host": "127.0.0.1",
        "port": "3306",
        "user": "bk",
        "password": secret,
        "max_connections": "4",
    }
    response = operator_client.post(url, data, **HX)
    assert response.status_code == 200 and response["HX-Redirect"].endswith(
        f"/clusters/{cluster.name}/"
    )
    instance = Instance.objects.get(cluster=cluster, name="m9")
    with connection.cursor() as cur:
        cur.execute("SELECT * FROM shards_instance WHERE id = %s", [instance.pk])
        assert secret not in repr(cur.fetchall())
    pages = [
        reverse("shards:cluster_detail", args=[cluster.name]),
        reverse("shards:instance_edit", args=[cluster.name, "m9"]),
        reverse("shards:topology_export") + f"?cluster={cluster.name}",
        reverse("audit_log"),
    ]
    admin = make_user("admin")
    admin_client = Client()
    admin_client.force_login(admin)
    for page in pages:
        assert secret not in operator_client.get(page).content.decode()
        assert secret not in admin_client.get(page).content.decode()
    # Editing with a blank password keeps it (on the same host, port and user: a stored
    # password never follows a new server, see tests/shards/test_trust_connection.py).
    edit = reverse("shards:instance_edit", args=[cluster.name, "m9"])
    operator_client.post(edit, {**data, "max_connections": "5", "password": ""})
    instance.refresh_from_db()
    assert instance.max_connections == 5 and instance_endpoint(instance).password == secret
    assert AuditEvent.objects.filter(action="instance.update", object_id=str(instance.pk)).exists()


def test_a_password_stored_under_an_old_data_key_can_be_replaced_from_the_edit_page(
    operator_client, settings
):
    target = Cluster.objects.create(name="rotated")
    instance_create(
        actor="test", cluster=target, name="r1", host="127.0.0.1", user="bk", password="old-pw"
    )
    settings.SHARDVAULT_DATA_KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()
    edit = reverse("shards:instance_edit", args=[target.name, "r1"])
    data = {"host": "127.0.0.1", "port": "3306", "user": "bk", "max_connections": "4"}
    response = operator_client.post(edit, {**data, "password": "new-pw"})
    assert response.status_code == 302
    assert instance_endpoint(Instance.objects.get(cluster=target, name="r1")).password == "new-pw"


def test_test_connection_from_the_edit_form_uses_the_typed_password_over_an_unreadable_one(
    operator_client, settings, mariadb_servers, unique_name
):
    server = mariadb_servers[0]
    user = f"tp{unique_name}"[:32]
    server.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'typed-Pw-1'")
    try:
        target = Cluster.objects.create(name=f"tp{unique_name}")
        instance_create(
            actor="test", cluster=target, name="r1", host="127.0.0.1", port=server.port,
            user=user, password="old-pw",
        )  # fmt: skip
        settings.SHARDVAULT_DATA_KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()
        form = {
            "instance": "r1", "host": "127.0.0.1", "port": str(server.port), "user": user,
            "password": "typed-Pw-1", "max_connections": "4",
        }  # fmt: skip
        html = operator_client.post(
            reverse("shards:instance_test", args=[target.name]), form, **HX
        ).content.decode()
        assert 'data-ok="true"' in html and "connected to r1" in html
    finally:
        server.execute(f"DROP USER '{user}'@'%'")


def test_test_connection_answers_with_a_partial(operator_client, cluster, mariadb_servers):
    url = reverse("shards:instance_test", args=[cluster.name])
    name = mariadb_servers[0].name
    ok = operator_client.post(url, {"instance": name}, **HX).content.decode()
    assert 'data-ok="true"' in ok and f"connected to {name}" in ok
    port = free_port()
    form = {
        "name": "new",
        "host": "127.0.0.1",
        "port": str(port),
        "user": "root",
        "max_connections": "4",
    }
    bad = operator_client.post(url, form, **HX).content.decode()
    assert 'data-ok="false"' in bad and f"cannot reach new (127.0.0.1:{port})" in bad
    bad_port = operator_client.post(url, {**form, "port": "0"}, **HX).content.decode()
    assert "out of range" in bad_port
    server = mariadb_servers[0]
    wrong = {**form, "port": str(server.port), "user": "nobody_here", "password": "x"}
    denied = operator_client.post(url, wrong, **HX).content.decode()
    assert "access denied for user &#x27;nobody_here&#x27;" in denied


def test_shard_form_refuses_an_instance_of_another_cluster_and_duplicates(operator_client, cluster):
    other = Cluster.objects.create(name="other")
    Instance.objects.create(cluster=other, name="zz", host="127.0.0.1", user="u")
    url = reverse("shards:shard_create", args=[cluster.name])
    html = operator_client.post(
        url, {"name": "s9", "instance": "zz", "database": "d"}, **HX
    ).content.decode()
    assert "Choose an instance of this cluster." in html
    first = cluster.shards.get(name="s00")
    html = operator_client.post(
        url, {"name": "s00", "instance": first.instance.name, "database": "d"}, **HX
    )
    assert "already has a shard named" in html.content.decode()
    assert "already has a shard named" in _field_errors(html.content.decode(), "name")
    data = {"name": "s9", "instance": first.instance.name, "database": first.database}
    html = operator_client.post(url, data, **HX).content.decode()
    assert "is already a shard" in html
    assert "is already a shard" in _field_errors(html, "database")
    assert not Shard.objects.filter(name="s9").exists()


def test_discover_button_runs_the_job_and_polling_stops_with_the_grid(
    operator_client, cluster, run_jobs, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = operator_client.post(
            reverse("shards:discovery_start", args=[cluster.name]), **HX
        )
    run = DiscoveryRun.objects.get(cluster=cluster)
    assert run.job_id == f"discover-{run.pk}"
    progress_url = reverse("shards:discovery_progress", args=[cluster.name, run.pk])
    assert f'hx-get="{progress_url}"' in response.content.decode()
    assert f'href="{progress_url}"' in response.content.decode()
    polling = operator_client.get(progress_url, **HX)
    assert polling.status_code == 200 and 'hx-trigger="every 1s"' in polling.content.decode()
    run_jobs("default")
    done = operator_client.get(progress_url, **HX)
    html = done.content.decode()
    assert done.status_code == 286
    assert 'hx-swap-oob="true"' in html and 'data-table="t_order"' in html
    assert 'data-discovery-status="succeeded"' in html
    # Without JavaScript the link leads back to the page.
    assert operator_client.get(progress_url).status_code == 302


def test_discover_button_without_redis_marks_the_run_failed_with_a_sentence(
    operator_client, settings, django_capture_on_commit_callbacks
):
    target = Cluster.objects.create(name="noredis")
    settings.RQ_QUEUES["default"]["URL"] = f"redis://127.0.0.1:{free_port()}/0"
    with django_capture_on_commit_callbacks(execute=True):
        response = operator_client.post(reverse("shards:discovery_start", args=[target.name]), **HX)
    assert response.status_code == 200
    run = DiscoveryRun.objects.get(cluster=target)
    assert run.status == DiscoveryRun.Status.FAILED
    assert run.error == "the job queue (Redis) is not reachable: start Redis and try again"


def test_a_discovery_whose_requester_lost_the_role_fails_instead_of_staying_queued(
    run_jobs, django_capture_on_commit_callbacks
):
    target = Cluster.objects.create(name="lostrole")
    operator = make_user("operator")
    with django_capture_on_commit_callbacks(execute=True):
        run = discovery_request(cluster=target, actor=operator)
    operator.groups.remove(Group.objects.get(name="operator"))
    run_jobs("default")
    run.refresh_from_db()
    assert run.status == DiscoveryRun.Status.FAILED
    assert "may not run discovery" in run.error
    assert AuditEvent.objects.filter(action="discovery.fail", object_id=str(target.pk)).exists()


def test_import_upload_reports_the_line_and_saves_nothing(operator_client):
    url = reverse("shards:topology_import")
    bad = SimpleUploadedFile("t.yaml", b"clusters:\n  - name: x\n    bogus: 1\n")
    html = operator_client.post(url, {"file": bad}).content.decode()
    assert "t.yaml: line 3: unknown key &#x27;bogus&#x27; in cluster &#x27;x&#x27;" in html
    assert not Cluster.objects.exists()
    good = SimpleUploadedFile(
        "t.yaml",
        b"clusters:\n  - name: x\n    instances:\n      - {name: a, host: 127.0.0.1, user: u}\n",
    )
    response = operator_client.post(url, {"file": good})
    assert response.status_code == 302
    assert Cluster.objects.get(name="x").instances.get().name == "a"


def test_export_download_is_an_attachment_that_import_accepts(operator_client, cluster):
    response = operator_client.get(reverse("shards:topology_export"))
    assert response["Content-Disposition"] == 'attachment; filename="topology-all.yaml"'
    summary = topology_import(actor="test", document=parse_topology(response.content.decode()))
    assert not summary.changed


def test_readers_cannot_write_through_services(cluster):
    auditor = make_user("auditor")
    with pytest.raises(RoleDenied):
        cluster_create(actor=auditor, name="nope")
    with pytest.raises(RoleDenied):
        instance_create(actor=auditor, cluster=cluster, name="x", host="h", user="u")
    with pytest.raises(RoleDenied):
        shard_create(
            actor=auditor,
            cluster=cluster,
            name="x",
            instance=cluster.instances.first(),
            database="d",
        )


def test_shard_form_test_names_a_missing_database(operator_client, cluster):
    url = reverse("shards:shard_test", args=[cluster.name])
    shard = cluster.shards.select_related("instance").get(name="s00")
    data = {"name": "s9", "instance": shard.instance.name, "database": "no_such_db"}
    html = operator_client.post(url, data, **HX).content.decode()
    assert 'data-ok="false"' in html
    assert f"database &#x27;no_such_db&#x27; does not exist on {shard.instance.name}" in html
    html = operator_client.post(url, {**data, "database": shard.database}, **HX).content.decode()
    assert 'data-ok="true"' in html
