"""Master key rotation: sets encrypted and passwords stored under key A, rotated to key B
(a first `manage.py keys rotate` killed part-way, then a re-run), then A removed from the
environment: verification gives Q = 1, a restore and a new backup work.

Real MariaDB servers (their root passwords stored encrypted), a real RQ worker, two storage
targets (`default` and a file target `offsite` holding a copy of every set).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection

from backups.engine import keys as engine_keys
from backups.engine.manifest import manifest_key, manifest_read, manifest_write
from backups.models import BackupPolicy, BackupSet, SetCopy
from backups.services.keys import set_targets
from backups.services.sets import set_prefix
from backups.services.storage_targets import storage_target_add
from console import keys as console_keys
from console.models import AuditEvent
from shards.models import Cluster, Instance
from tests.backups.test_copies import _restore_side, _verify
from tests.backups.test_restore_rules import make_backup
from tests.conftest import ROOT
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def _new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _keys_json(action: str) -> dict:
    out = StringIO()
    call_command("keys", action, "--json", stdout=out)
    return json.loads(out.getvalue())


def _by_id(result: dict) -> dict:
    return {k["id"]: k for k in result["keys"]}


@pytest.fixture
def key_a(settings):
    key = _new_key()
    settings.SHARDVAULT_DATA_KEY = key
    settings.SHARDVAULT_OLD_DATA_KEYS = []
    return key


@pytest.fixture
def cluster(key_a, mariadb_servers, unique_name, settings, tmp_path):
    settings.BACKUP_CHUNK_ROWS = 200
    cluster = make_cluster(
        mariadb_servers[:2], name=f"ky{unique_name}", tables={"t_order": 500, "t_user": 30}
    )
    storage_target_add(
        name="offsite", url=f"file://{tmp_path / 'offsite'}", user=make_user("admin")
    )
    BackupPolicy.objects.update_or_create(
        cluster=cluster,
        defaults={"verify_automatically": False, "copy_to": ["offsite"], "encrypt": True},
    )
    return cluster


def _manifest_signers(backup_set) -> list[str]:
    """The key id each target's manifest is signed with (checked with every configured key)."""
    keyring = console_keys.manifest_hmac_key()
    signers = []
    for _name, storage in set_targets(backup_set):
        doc = manifest_read(storage, set_prefix(backup_set), keyring)
        signers.append(doc["signature"].get("key_id", ""))
    return signers


def _rotate_subprocess(settings, tmp_path, key_a, key_b) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
            "REDIS_URL": settings.RQ_QUEUES["default"]["URL"],
            "STORAGE_URL": settings.STORAGE_URL,
            "SHARDVAULT_DATA_KEY": key_b,
            "SHARDVAULT_OLD_DATA_KEYS": key_a,
            "SHARDVAULT_SECRET_KEY": settings.SECRET_KEY,
            "SHARDVAULT_TEST_ROTATE_PAUSE_SECONDS": "30",
        }
    )
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "keys", "rotate", "--json"],
        env=env,
        cwd=ROOT,
        stdout=open(tmp_path / "rotate.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_rotation_killed_part_way_then_rerun_lets_the_old_key_go(
    cluster, key_a, settings, tmp_path, run_jobs, mariadb_servers
):
    first = make_backup(cluster, run_jobs)
    second = make_backup(cluster, run_jobs)
    for backup_set in (first, second):
        assert backup_set.encrypted
        assert SetCopy.objects.get(backup_set=backup_set, target="offsite").state == "complete"
    # Data from before key ids existed: a bare Fernet password token and a manifest whose
    # signature names no key.
    other = Cluster.objects.create(name=f"{cluster.name}x")
    fernet = Fernet(base64.urlsafe_b64encode(engine_keys.derive_key(key_a, "shard-passwords")))
    legacy = Instance.objects.create(
        cluster=other,
        name="old",
        host="127.0.0.1",
        port=3306,
        user="backup",
        password_encrypted=fernet.encrypt(b"legacy-pw").decode(),
    )
    assert console_keys.decrypt_secret(legacy.password_encrypted) == "legacy-pw"
    default = set_targets(first)[0][1]
    doc = manifest_read(default, set_prefix(first), console_keys.manifest_hmac_key())
    manifest_write(default, set_prefix(first), doc, engine_keys.manifest_hmac_key(key_a))

    id_a = engine_keys.key_id(key_a)
    assert (
        len(id_a) == 8
        and id_a == hashlib.sha256(engine_keys.decode_master_key(key_a)).hexdigest()[:8]
    )
    passwords = Instance.objects.exclude(password_encrypted="").count()
    assert passwords >= 1
    status = _keys_json("status")
    assert status["current"] == id_a
    assert _by_id(status)[id_a] == {
        "id": id_a,
        "sets": 2,
        "passwords": passwords,
        "manifests": 4,
    }

    # Rotate to B with A kept to read; the first run is killed after the first set.
    key_b = _new_key()
    id_b = engine_keys.key_id(key_b)
    settings.SHARDVAULT_DATA_KEY = key_b
    settings.SHARDVAULT_OLD_DATA_KEYS = [key_a]
    proc = _rotate_subprocess(settings, tmp_path, key_a, key_b)
    deadline = time.monotonic() + 120
    while BackupSet.objects.get(pk=first.pk).key_id != id_b:
        assert proc.poll() is None, (tmp_path / "rotate.log").read_text()
        assert time.monotonic() < deadline, "the rotation never rewrapped the first set"
        time.sleep(0.2)
    time.sleep(1.0)  # its manifests are being or have been re-signed; the pause follows
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    # Killed part-way: the first set is on B, the second still on A, and every manifest on
    # every target verifies with one of the configured keys.
    assert BackupSet.objects.get(pk=second.pk).key_id != id_b
    assert not AuditEvent.objects.filter(action="keys.rotate").exists()
    for backup_set in (first, second):
        assert len(_manifest_signers(backup_set)) == 2
    partial = _by_id(_keys_json("status"))
    assert partial[id_b]["sets"] == 1 and partial[id_a]["sets"] == 1

    rerun = _keys_json("rotate")
    assert rerun["current"] == id_b and rerun["error"] == ""
    assert rerun["rotated"]["sets"] == 1
    after = _by_id(rerun)
    assert after[id_a] == {"id": id_a, "sets": 0, "passwords": 0, "manifests": 0}
    assert after[id_b] == {"id": id_b, "sets": 2, "passwords": passwords, "manifests": 4}, rerun
    event = AuditEvent.objects.get(action="keys.rotate")
    assert event.details["current"] == id_b and event.details["sets"] == 1
    for backup_set in (first, second):
        backup_set.refresh_from_db()
        assert _manifest_signers(backup_set) == [id_b, id_b]
        data = default.get_bytes(manifest_key(set_prefix(backup_set)))
        assert hashlib.sha256(data).hexdigest() == backup_set.manifest_sha256
        assert not default.exists(manifest_key(set_prefix(backup_set)) + ".new")
    # Idempotent: a second run changes nothing.
    again = _keys_json("rotate")
    assert again["rotated"] | {"problems": []} == {
        "sets": 0,
        "passwords": 0,
        "manifests": 0,
        "skipped_running": 0,
        "problems": [],
    }

    # A leaves the environment: everything still verifies, restores and backs up.
    settings.SHARDVAULT_OLD_DATA_KEYS = []
    legacy.refresh_from_db()
    assert legacy.password_encrypted.startswith(f"sv2.{id_b}.")
    assert console_keys.decrypt_secret(legacy.password_encrypted) == "legacy-pw"
    status = _keys_json("status")
    assert [k["id"] for k in status["keys"]] == [id_b]
    for backup_set in (first, second):
        code, summary, err = _verify(backup_set.pk)
        assert code == 0, err
        assert summary["q"] == 1.0 and summary["problems"] == []
    _restore_side(cluster, second, run_jobs, mariadb_servers)
    fresh = make_backup(cluster, run_jobs)
    assert fresh.encrypted and fresh.key_id == id_b
    code, summary, err = _verify(fresh.pk)
    assert code == 0 and summary["q"] == 1.0, err


def test_keys_status_never_shows_a_key(key_a, settings):
    out = StringIO()
    call_command("keys", "status", stdout=out)
    text = out.getvalue()
    assert engine_keys.key_id(key_a) in text and key_a not in text
    assert "(current)" in text


def test_password_is_read_with_the_key_its_id_names(key_a, settings):
    token = console_keys.encrypt_secret("s3cret")
    assert token.startswith(f"sv2.{engine_keys.key_id(key_a)}.")
    settings.SHARDVAULT_DATA_KEY = _new_key()
    with pytest.raises(Exception, match="cannot be decrypted"):
        console_keys.decrypt_secret(token)
    settings.SHARDVAULT_OLD_DATA_KEYS = [key_a]
    assert console_keys.decrypt_secret(token) == "s3cret"
    assert console_keys.secret_key_id(token) == engine_keys.key_id(key_a)


def test_keys_page_shows_key_ids_to_admins_only(client, key_a, settings):
    from tests.backups.test_backup_pages import login

    key_b = _new_key()
    settings.SHARDVAULT_DATA_KEY = key_b
    settings.SHARDVAULT_OLD_DATA_KEYS = [key_a]
    other = Cluster.objects.create(name="kp")
    Instance.objects.create(
        cluster=other,
        name="a",
        host="127.0.0.1",
        user="backup",
        password_encrypted=engine_keys.encrypt_secret("pw", key_a),
    )
    login(client, "operator")
    assert client.get("/backups/keys/").status_code == 403
    login(client, "admin")
    html = client.get("/backups/keys/").content.decode()
    id_a, id_b = engine_keys.key_id(key_a), engine_keys.key_id(key_b)
    assert f'data-key-id="{id_b}"' in html and f'data-key-id="{id_a}"' in html
    assert "old: still in use" in html
    assert key_a not in html and key_b not in html


def test_a_set_key_wrapped_under_the_legacy_key_id_still_opens(key_a, settings):
    """Sets made before key ids were 8 hex digits carry sha256("key-id:" + key)[:16]."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    legacy_id = engine_keys.legacy_key_id(key_a)
    assert len(legacy_id) == 16 and legacy_id != engine_keys.key_id(key_a)
    data_key, nonce = os.urandom(32), os.urandom(12)
    sealed = AESGCM(engine_keys.derive_key(key_a, "backup-kek")).encrypt(
        nonce, data_key, f"shardvault-data-key:sv1:{legacy_id}".encode()
    )
    wrapped = f"sv1.{legacy_id}.{base64.urlsafe_b64encode(nonce + sealed).decode().rstrip('=')}"
    settings.SHARDVAULT_DATA_KEY = _new_key()
    settings.SHARDVAULT_OLD_DATA_KEYS = [key_a]
    assert console_keys.data_key_unwrap(wrapped) == data_key
    assert console_keys.canonical_key_id(legacy_id) == engine_keys.key_id(key_a)
    rewrapped = console_keys.data_key_rewrap(wrapped)
    assert rewrapped.split(".")[1] == console_keys.current_key_id()
    settings.SHARDVAULT_OLD_DATA_KEYS = []
    assert console_keys.data_key_unwrap(rewrapped) == data_key
