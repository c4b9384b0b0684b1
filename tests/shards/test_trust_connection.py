"""Trust boundary on the topology side (issue 12, items 1, 11, 12): stored passwords stay with
their server, password variables follow the rules, connection fields cannot smuggle options, and
a silent or odd server gets one sentence instead of a hang or a 500."""

from __future__ import annotations

import io
import time

import pymysql
import pytest
import yaml
from django.core.management import call_command
from django.urls import reverse

from shards.models import Cluster, Finding, Instance
from shards.selectors import MissingPassword, instance_endpoint
from shards.services.discovery_runs import discovery_run
from shards.services.topology import TopologyError, instance_create, instance_update
from shards.services.topology_import import topology_import
from shards.topology_file import parse_topology
from tests.factories import make_user

pytestmark = pytest.mark.django_db

HX = {"HTTP_HX_REQUEST": "true"}
SECRET = "stored-Secret-pw-9"


@pytest.fixture
def operator_client(client):
    client.force_login(make_user("operator"))
    return client


@pytest.fixture
def stored(mariadb_servers, unique_name):
    """An instance with a stored password, pointing at a real server."""
    cluster = Cluster.objects.create(name=f"tr{unique_name}")
    server = mariadb_servers[0]
    user = f"tr{unique_name}"[:32]
    server.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{SECRET}'")
    instance = instance_create(
        actor="test", cluster=cluster, name="db1", host="127.0.0.1", port=server.port,
        user=user, password=SECRET,
    )  # fmt: skip
    yield instance
    server.execute(f"DROP USER '{user}'@'%'")


def _test_connection(client, cluster: str, form: dict) -> str:
    response = client.post(reverse("shards:instance_test", args=[cluster]), form, **HX)
    assert response.status_code == 200
    return response.content.decode()


# --- item 1: a stored password goes only to the server it was stored for -----------------


def test_testing_a_stored_instance_against_another_host_asks_for_the_password_again(
    operator_client, stored, fake_mysql
):
    fake = fake_mysql(auth_switch="mysql_clear_password")
    form = {
        "instance": "db1", "host": fake.host, "port": str(fake.port), "user": stored.user,
        "password": "", "max_connections": "4",
    }  # fmt: skip
    html = _test_connection(operator_client, stored.cluster.name, form)
    assert 'data-ok="false"' in html
    assert "only sent to the host, port and user it was stored for" in html
    assert fake.connections == 0 and fake.received_passwords == []
    # The same form on the stored host, port and user still uses the stored password.
    same = {**form, "host": stored.host, "port": str(stored.port)}
    assert 'data-ok="true"' in _test_connection(operator_client, stored.cluster.name, same)


def test_a_typed_password_is_never_offered_in_clear_text_and_the_page_says_why(
    operator_client, stored, fake_mysql
):
    fake = fake_mysql(auth_switch="mysql_clear_password")
    form = {
        "name": "new", "host": fake.host, "port": str(fake.port), "user": "root",
        "password": "typed-pw", "max_connections": "4",
    }  # fmt: skip
    html = _test_connection(operator_client, stored.cluster.name, form)
    assert 'data-ok="false"' in html and "clear text" in html
    assert fake.received_passwords == []


def test_changing_host_port_or_user_without_the_password_is_refused(stored, fake_mysql):
    fake = fake_mysql()
    before = Instance.objects.get(pk=stored.pk)
    for change in ({"host": "10.9.9.9"}, {"port": fake.port}, {"user": "someone"}):
        values = {"host": stored.host, "port": stored.port, "user": stored.user, **change}
        with pytest.raises(TopologyError) as refused:
            instance_update(actor="test", instance=stored, password=None, **values)
        assert "needs the password again" in str(refused.value)
    after = Instance.objects.get(pk=stored.pk)
    assert (after.host, after.port, after.user) == (before.host, before.port, before.user)
    assert instance_endpoint(after).password == SECRET
    # Given the password again, the move is allowed.
    instance_update(
        actor="test", instance=stored, host=stored.host, port=fake.port, user=stored.user,
        password="new-pw",
    )  # fmt: skip
    assert instance_endpoint(Instance.objects.get(pk=stored.pk)).password == "new-pw"


def test_the_edit_page_refuses_a_new_host_without_the_password(operator_client, stored):
    url = reverse("shards:instance_edit", args=[stored.cluster.name, "db1"])
    data = {
        "host": "10.9.9.9",
        "port": str(stored.port),
        "user": stored.user,
        "max_connections": "4",
    }
    html = operator_client.post(url, data, **HX).content.decode()
    assert "needs the password again" in html
    assert Instance.objects.get(pk=stored.pk).host == "127.0.0.1"


def test_importing_a_new_host_for_a_stored_password_is_refused(stored):
    text = (
        f"clusters:\n  - name: {stored.cluster.name}\n    instances:\n"
        f"      - {{name: db1, host: 10.9.9.9, port: {stored.port}, user: {stored.user}}}\n"
    )
    with pytest.raises(TopologyError) as refused:
        topology_import(actor="test", document=parse_topology(text))
    assert "needs the password again" in str(refused.value)
    assert Instance.objects.get(pk=stored.pk).host == "127.0.0.1"


@pytest.mark.parametrize("name", ["SHARDVAULT_DATA_KEY", "DATABASE_URL", "AWS_SECRET_ACCESS_KEY"])
def test_password_env_naming_the_consoles_own_variables_is_refused_on_save_and_import(stored, name):
    with pytest.raises(TopologyError) as refused:
        instance_create(
            actor="test", cluster=stored.cluster, name="x", host="127.0.0.1", user="u",
            password_env=name,
        )  # fmt: skip
    assert "console's own variables" in str(refused.value)
    text = (
        f"clusters:\n  - name: {stored.cluster.name}\n    instances:\n"
        f"      - {{name: db1, host: 127.0.0.1, port: {stored.port}, user: {stored.user}, "
        f"password_env: {name}}}\n"
    )
    with pytest.raises(TopologyError):
        topology_import(actor="test", document=parse_topology(text))
    assert not Instance.objects.get(pk=stored.pk).password_env


def test_password_env_outside_the_pattern_is_refused_and_the_pattern_is_a_setting(
    stored, settings, monkeypatch
):
    with pytest.raises(TopologyError) as refused:
        instance_create(
            actor="test", cluster=stored.cluster, name="x", host="127.0.0.1", user="u",
            password_env="HOME",
        )  # fmt: skip
    assert "SHARDVAULT_PASSWORD_ENV_PATTERN" in str(refused.value)
    settings.SHARDVAULT_PASSWORD_ENV_PATTERN = ["DBPASS_*"]
    monkeypatch.setenv("DBPASS_X", "pw")
    made = instance_create(
        actor="test", cluster=stored.cluster, name="x", host="127.0.0.1", user="u",
        password_env="DBPASS_X",
    )  # fmt: skip
    assert instance_endpoint(made).password == "pw"


def test_a_denied_password_env_already_in_the_database_is_never_read_at_connect_time(
    operator_client, stored, fake_mysql, monkeypatch
):
    """A row saved before the rule (or edited in the database): the connect path checks too."""
    fake = fake_mysql()
    monkeypatch.setenv("SHARDVAULT_DATA_KEY", "the-master-key")
    Instance.objects.filter(pk=stored.pk).update(
        host=fake.host, port=fake.port, password_env="SHARDVAULT_DATA_KEY", password_encrypted=""
    )
    with pytest.raises(MissingPassword) as refused:
        instance_endpoint(Instance.objects.get(pk=stored.pk))
    assert "console's own variables" in str(refused.value)
    html = _test_connection(operator_client, stored.cluster.name, {"instance": "db1"})
    assert 'data-ok="false"' in html and "console&#x27;s own variables" in html
    assert fake.connections == 0


# --- item 11: no control characters, hosts are host names or addresses ----------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("host", "127.0.0.1\nssl-ca=/tmp/x"),
        ("host", "evil host"),
        ("user", "root\r\n[client]"),
        ("tls_ca", "/ca.pem\npassword=x"),
    ],
)
def test_connection_fields_with_control_characters_are_refused_on_save_and_import(
    stored, field, value
):
    values = {"host": "127.0.0.1", "user": "root", "tls_ca": "", field: value}
    with pytest.raises(TopologyError):
        instance_create(actor="test", cluster=stored.cluster, name="x", **values)
    assert not Instance.objects.filter(cluster=stored.cluster, name="x").exists()
    item = {"name": "db1", "host": "127.0.0.1", "port": stored.port, "user": stored.user}
    text = yaml.safe_dump(
        {"clusters": [{"name": stored.cluster.name, "instances": [{**item, field: value}]}]}
    )
    with pytest.raises(TopologyError):
        topology_import(actor="test", document=parse_topology(text))
    assert Instance.objects.get(pk=stored.pk).host == "127.0.0.1"


def test_a_password_with_a_newline_is_refused(stored):
    with pytest.raises(TopologyError) as refused:
        instance_create(
            actor="test", cluster=stored.cluster, name="x", host="127.0.0.1", user="u",
            password="pw\nplugin-dir=/tmp",
        )  # fmt: skip
    assert "control character" in str(refused.value)


# --- item 12: silent and odd servers ------------------------------------------------------


def test_a_silent_server_gets_an_answer_from_the_test_page_within_seconds(
    operator_client, stored, fake_mysql
):
    fake = fake_mysql(mode="silent")
    form = {
        "name": "new", "host": fake.host, "port": str(fake.port), "user": "root",
        "password": "x", "max_connections": "4",
    }  # fmt: skip
    started = time.monotonic()
    html = _test_connection(operator_client, stored.cluster.name, form)
    assert time.monotonic() - started < 15
    assert 'data-ok="false"' in html and "new (127.0.0.1:" in html
    assert "did not answer in time" in html


def test_a_server_answering_empty_results_gets_a_sentence_not_a_500(
    operator_client, stored, fake_mysql
):
    fake = fake_mysql(queries="empty")
    form = {
        "name": "odd", "host": fake.host, "port": str(fake.port), "user": "root",
        "password": "x", "max_connections": "4",
    }  # fmt: skip
    html = _test_connection(operator_client, stored.cluster.name, form)
    assert 'data-ok="false"' in html
    assert f"odd (127.0.0.1:{fake.port})" in html and "gave no answer" in html


@pytest.mark.parametrize("mode", ["silent", "empty"])
def test_discovery_of_a_silent_or_odd_server_ends_with_one_finding_naming_it(
    stored, fake_mysql, mode, tmp_path
):
    fake = fake_mysql(mode="silent") if mode == "silent" else fake_mysql(queries="empty")
    cluster = Cluster.objects.create(name=f"{stored.cluster.name}{mode[:2]}")
    instance_create(
        actor="test", cluster=cluster, name="odd", host=fake.host, port=fake.port, user="u",
        password="x",
    )  # fmt: skip
    started = time.monotonic()
    discovery_run(cluster=cluster, actor="test")
    assert time.monotonic() - started < 20
    errors = list(
        Finding.objects.filter(cluster=cluster, severity="error").values_list("message", flat=True)
    )
    assert any(f"odd (127.0.0.1:{fake.port})" in m for m in errors), errors
    assert not any("NoneType" in m for m in errors)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit):
        call_command("topology", "discover", cluster.name, stdout=out, stderr=err)
    assert "NoneType" not in out.getvalue() + err.getvalue()


def test_a_server_that_hangs_mid_query_is_given_up_on_by_discovery_and_restore_probes(
    stored, fake_mysql, monkeypatch
):
    """Greets, accepts the session set-up, then never answers a question."""
    from backups.engine import target as restore_target
    from backups.engine.mysql import Endpoint
    from shards import discovery

    monkeypatch.setattr(discovery, "METADATA_TIMEOUT_SECONDS", 1)
    monkeypatch.setattr(restore_target, "METADATA_TIMEOUT_SECONDS", 1)
    fake = fake_mysql(queries="mute")
    endpoint = Endpoint(name="hung", host=fake.host, port=fake.port, user="u", password="x")
    started = time.monotonic()
    ok, message = discovery.connection_check(endpoint)
    assert not ok and f"hung (127.0.0.1:{fake.port})" in message and "in time" in message
    with pytest.raises(pymysql.err.OperationalError) as probe:
        restore_target.non_empty_tables(endpoint, "db", ["t"])
    assert "timed out" in str(probe.value)
    assert time.monotonic() - started < 10
