"""`manage.py topology import/export`: round trip, idempotence, and every kind of bad input."""

from __future__ import annotations

import io

import pytest
import yaml
from django.core.management import CommandError, call_command
from django.db import connection

from backups.models import BackupSet, ShardBackup
from console.models import AuditEvent
from shards.models import Cluster, Instance, Shard
from shards.selectors import instance_endpoint
from tests.shards.conftest import topology_yaml

pytestmark = pytest.mark.django_db


def _import(tmp_path, text: str, name: str = "topology.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    out = io.StringIO()
    call_command("topology", "import", str(path), stdout=out)
    return out.getvalue()


def _export(*args: str) -> str:
    out = io.StringIO()
    call_command("topology", "export", *args, stdout=out)
    return out.getvalue()


def _import_error(tmp_path, text: str) -> str:
    with pytest.raises(CommandError) as excinfo:
        _import(tmp_path, text)
    return str(excinfo.value)


FILE = """\
clusters:
  - name: orders
    shard_key: user_id
    instances:
      - {name: a, host: 127.0.0.1, port: 3306, user: backup, password_env: SHARD_A_PW}
      - {name: b, host: 127.0.0.2, port: 3307, user: backup, password: "s3cret-Pässword"}
      - {name: d, host: 127.0.0.3, port: 3308, user: drill}
    shards:
      - {name: s00, instance: a, database: orders_00}
      - {name: s01, instance: b, database: "orders `01` x"}
    logical_tables:
      - {name: t_order, pattern: "t_order_[0-9]+"}
    drill_instance: d
"""


def test_import_creates_the_cluster_and_export_round_trips(tmp_path):
    out = _import(tmp_path, FILE)
    assert "created" in out
    cluster = Cluster.objects.get(name="orders")
    assert cluster.drill_instance.name == "d"
    assert {s.name: (s.instance.name, s.database) for s in cluster.shards.all()} == {
        "s00": ("a", "orders_00"),
        "s01": ("b", "orders `01` x"),
    }
    exported = _export("--cluster", "orders")
    # Re-importing the export changes nothing, and it describes the same topology.
    assert _import(tmp_path, exported, "again.yaml").strip() == "no changes"
    data = yaml.safe_load(exported)["clusters"][0]
    assert data["instances"][0] == {
        "name": "a",
        "host": "127.0.0.1",
        "port": 3306,
        "user": "backup",
        "password_env": "SHARD_A_PW",
    }
    assert data["drill_instance"] == "d"
    assert data["logical_tables"] == [{"name": "t_order", "pattern": "t_order_[0-9]+"}]


def test_import_twice_changes_nothing_and_writes_no_audit_events(tmp_path):
    _import(tmp_path, FILE)
    events = AuditEvent.objects.count()
    before = list(Instance.objects.values_list("pk", "password_encrypted", "host"))
    assert _import(tmp_path, FILE).strip() == "no changes"
    assert AuditEvent.objects.count() == events
    assert list(Instance.objects.values_list("pk", "password_encrypted", "host")) == before


def test_import_update_and_removal_are_audited(tmp_path):
    _import(tmp_path, FILE)
    changed = FILE.replace("port: 3307", "port: 3317").replace(
        '      - {name: s01, instance: b, database: "orders `01` x"}\n', ""
    )
    out = _import(tmp_path, changed)
    assert "updated 1: instance orders/b" in out
    assert "deleted 1: shard orders/s01" in out
    assert Instance.objects.get(name="b").port == 3317
    assert not Shard.objects.filter(name="s01").exists()
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"cluster.create", "instance.create", "instance.update", "shard.delete"} <= actions


def test_passwords_are_never_exported_nor_stored_in_clear(tmp_path):
    _import(tmp_path, FILE)
    exported = _export()
    assert "s3cret" not in exported and "password:" not in exported
    with connection.cursor() as cur:
        cur.execute("SELECT * FROM shards_instance")
        raw = repr(cur.fetchall())
    assert "s3cret" not in raw
    assert instance_endpoint(Instance.objects.get(name="b")).password == "s3cret-Pässword"
    details = repr(list(AuditEvent.objects.values_list("details", flat=True)))
    assert "s3cret" not in details


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("clusters:\n  - name: x\n    instances: [\n", "line 4"),  # malformed YAML
        ("clusters:\n  - name: x\n    hots: 1\n", "line 3: unknown key 'hots' in cluster 'x'"),
        (
            "clusters:\n  - name: x\n    instances:\n      - {name: a, hots: h, user: u}\n",
            "line 4: unknown key 'hots'",
        ),
        (
            "clusters:\n  - name: x\n    instances:\n      - {name: a, host: h, port: 70000, user: u}\n",
            "line 4: instance 'a' port 70000 is out of range: use 1 to 65535",
        ),
        (
            "clusters:\n  - name: x\n    instances:\n      - {name: a, host: h, user: u}\n"
            "      - {name: a, host: h2, user: u}\n",
            "line 5: instance 'a' appears twice in cluster 'x'",
        ),
        (
            "clusters:\n  - name: x\n    instances:\n      - {name: a, host: h, user: u}\n"
            "    shards:\n      - {name: s0, instance: a, database: d0}\n"
            "      - {name: s0, instance: a, database: d1}\n",
            "line 7: shard 's0' appears twice in cluster 'x'",
        ),
        (
            "clusters:\n  - name: x\n    instances:\n      - {name: a, host: h, user: u}\n"
            "    shards:\n      - {name: s0, instance: zz, database: d0}\n",
            "line 6: shard 's0' points at instance 'zz', which cluster 'x' does not list",
        ),
        (
            "clusters:\n  - name: x\n    instances:\n      - {name: a, user: u}\n",
            "missing the required key 'host'",
        ),
        (
            "clusters:\n  - name: 'bad name'\n",
            "line 2: cluster name 'bad name' is not a valid name",
        ),
        ("", "the file is empty"),
    ],
)
def test_bad_files_are_refused_with_the_line_and_field_and_nothing_is_saved(
    tmp_path, text, expected
):
    message = _import_error(tmp_path, text)
    assert expected in message
    assert "\n" not in message
    assert not Cluster.objects.exists()


def test_a_failing_cluster_rolls_back_the_whole_file(tmp_path):
    _import(tmp_path, FILE)
    cluster = Cluster.objects.get(name="orders")
    # A shard that backups refer to cannot be removed; the file's other changes are undone too.
    shard = cluster.shards.get(name="s01")
    backup_set = BackupSet.objects.create(cluster=cluster, kind="full")
    ShardBackup.objects.create(backup_set=backup_set, shard=shard)
    changed = FILE.replace("port: 3306", "port: 3316").replace(
        '      - {name: s01, instance: b, database: "orders `01` x"}\n', ""
    )
    message = _import_error(tmp_path, changed)
    assert "shard orders/s01 cannot be removed" in message
    assert Instance.objects.get(name="a").port == 3306
    assert cluster.shards.filter(name="s01").exists()


def test_export_query_count_does_not_grow_with_clusters(tmp_path, django_assert_num_queries):
    for n in range(2):
        _import(tmp_path, FILE.replace("name: orders", f"name: orders{n}"))
    with django_assert_num_queries(5) as few:
        first = _export()
    for n in range(2, 6):
        _import(tmp_path, FILE.replace("name: orders", f"name: orders{n}"))
    with django_assert_num_queries(len(few.captured_queries)):
        exported = yaml.safe_load(_export())["clusters"]
    assert len(exported) == 6 and first
    assert all(c["drill_instance"] == "d" and c["logical_tables"] for c in exported)


def test_export_of_an_unknown_cluster_fails():
    with pytest.raises(CommandError, match="no cluster named 'nope'"):
        _export("--cluster", "nope")


@pytest.mark.django_db(transaction=True)
def test_command_errors_are_one_line_on_stderr_with_nonzero_exit(manage, tmp_path, mariadb_servers):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "clusters:\n  - name: x\n    instances:\n      - {name: a, host: h, port: 0, user: u}\n"
    )
    result = manage("topology", "import", str(bad))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "line 4: instance 'a' port 0 is out of range" in result.stderr
    assert "Traceback" not in result.stderr

    good = tmp_path / "good.yaml"
    good.write_text(topology_yaml(mariadb_servers[:1], cluster="cmd", databases=["cmd_00"]))
    first = manage("topology", "import", str(good))
    assert first.returncode == 0, first.stderr
    second = manage("topology", "import", str(good))
    assert second.returncode == 0 and second.stdout.strip() == "no changes"
    exported = manage("topology", "export", "--cluster", "cmd")
    assert exported.returncode == 0 and "name: cmd" in exported.stdout


POLICY_FILE = (
    FILE
    + """\
    policy:
      full_cron: "0 2 * * *"
      incremental_every_minutes: 5
      keep_daily: 14
      copy_to: [default]
      exclude_tables: ["scratch.*"]
      encrypt: true
"""
)


def test_the_policy_block_sets_only_the_fields_it_names_and_is_audited(tmp_path):
    from backups.models import BackupPolicy

    _import(tmp_path, FILE)
    assert not BackupPolicy.objects.exists()  # no policy block: the policy is untouched
    out = _import(tmp_path, POLICY_FILE)
    assert "policy orders" in out
    policy = BackupPolicy.objects.get(cluster__name="orders")
    assert policy.full_cron == "0 2 * * *" and policy.incremental_every_minutes == 5
    assert policy.keep_daily == 14 and policy.copy_to == ["default"] and policy.encrypt is True
    assert policy.exclude_tables == ["scratch.*"]
    assert policy.keep_weekly == 4 and policy.keep_days == 7  # not named: defaults kept
    event = AuditEvent.objects.get(action="policy.update")
    assert event.details["new"]["keep_daily"] == 14 and event.details["old"]["keep_daily"] == 7

    # A later file without the block, or with a block naming one field, leaves the rest alone.
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_monthly=9)
    _import(tmp_path, FILE)
    _import(tmp_path, FILE + "    policy:\n      keep_full: 3\n")
    policy.refresh_from_db()
    assert (policy.keep_full, policy.keep_monthly, policy.keep_daily) == (3, 9, 14)


def test_export_writes_every_policy_field_and_reimporting_it_changes_nothing(tmp_path):
    from backups.services.policies import POLICY_FIELDS

    _import(tmp_path, POLICY_FILE)
    exported = _export("--cluster", "orders")
    block = yaml.safe_load(exported)["clusters"][0]["policy"]
    assert list(block) == [f for f in POLICY_FIELDS if f in block] and set(block) == set(
        POLICY_FIELDS
    )
    assert block["full_cron"] == "0 2 * * *" and block["exclude_tables"] == ["scratch.*"]
    events = AuditEvent.objects.count()
    assert _import(tmp_path, exported, "again.yaml").strip() == "no changes"
    assert AuditEvent.objects.count() == events


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ('      full_cron: "99 * * * *"\n', "full_cron"),
        ("      copy_to: [offsite]\n", "copy_to"),
        ("      keep_days: -2\n", "keep_days"),
        ("      keep_forever: 1\n", "keep_forever"),
    ],
)
def test_a_bad_policy_block_is_refused_naming_the_field_and_nothing_is_saved(
    tmp_path, block, field
):
    error = _import_error(tmp_path, FILE + "    policy:\n" + block)
    assert field in error and "\n" not in error.strip()
    assert not Cluster.objects.filter(name="orders").exists()
