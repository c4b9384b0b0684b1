"""Master key rotation: what each key id protects (`keys_status`) and moving all of it to
the current key (`keys_rotate`).

A key protects three things: the wrapped data keys of encrypted sets (the set's row and the
copy its manifest holds), the stored shard passwords, and the manifest signatures (one
manifest per storage target holding the set). `keys_rotate` moves each to the current key
(SHARDVAULT_DATA_KEY), opening them with the key their id names (SHARDVAULT_OLD_DATA_KEYS).

Crash safety: a manifest is re-signed by writing `manifest.json.new` beside it, reading it
back and checking its signature with the current key, and only then replacing
`manifest.json` (an atomic put on every backend) and removing the `.new`. At every instant a
set has a manifest that verifies with one of the configured keys, and its wrapped key opens
with one of them too. Each step checks the state first and skips work already done, so a
re-run after a crash finishes the job and a second run changes nothing.

Sets still pending or running are left alone (their job writes the manifest when it ends,
with the key it started with) and are counted as `skipped_running`; run rotate again once
they end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from django.db import transaction

from backups.engine.errors import EngineError, KeyMaterialError
from backups.engine.keys import wrapped_key_id
from backups.engine.manifest import (
    manifest_bytes,
    manifest_encryption,
    manifest_key,
    manifest_sign,
    manifest_signing_key_id,
    manifest_verify,
)
from backups.models import BackupSet
from backups.services.sets import lock_set, set_prefix
from backups.services.storage_targets import set_all_targets
from backups.status import SetStatus
from backups.storage.base import Storage
from console import keys as console_keys
from console.audit import audit_record
from shards.models import Instance

log = logging.getLogger(__name__)

NEW_SUFFIX = ".new"
# Test hook: seconds to sleep after each set, so a test can kill a rotation part-way.
PAUSE_ENV = "SHARDVAULT_TEST_ROTATE_PAUSE_SECONDS"


def set_targets(backup_set: BackupSet) -> list[tuple[str, Storage]]:
    """[(target name, storage)] of every storage target that may hold the set's manifest,
    the set's default target first."""
    return set_all_targets(backup_set)


def _rotatable_sets():
    return (
        BackupSet.objects.exclude(status=SetStatus.EXPIRED)
        .exclude(status__in=SetStatus.ACTIVE)
        .select_related("cluster")
        .order_by("pk")
    )


def _read_manifest(storage: Storage, key: str) -> tuple[bytes, dict] | None:
    """The stored manifest and its document; None when the target holds none."""
    try:
        if not storage.exists(key):
            return None
        data = storage.get_bytes(key)
    except Exception:  # noqa: BLE001 - an unreachable target holds nothing we can read
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return data, {}
    return data, doc if isinstance(doc, dict) else {}


def manifest_signer_id(doc: dict) -> str:
    """The (current-form) id of the key whose signature the manifest carries; "" when no
    configured key verifies it."""
    kid = manifest_signing_key_id(doc)
    if kid:
        return console_keys.canonical_key_id(kid)
    for candidate in console_keys.all_master_keys():
        try:
            manifest_verify(doc, console_keys.keys.manifest_hmac_key(candidate))
        except EngineError:
            continue
        return console_keys.keys.key_id(candidate)
    return ""


def keys_status(*, manifests: bool = True) -> dict:
    """{"current", "keys": [{"id", "sets", "passwords", "manifests"}]}: per key id, how
    many encrypted sets' data keys, stored passwords and stored manifests it protects.

    Every configured key is listed (current first, then SHARDVAULT_OLD_DATA_KEYS), followed
    by any id found on data that no configured key has. Reads every set's manifest on every
    target that holds it; with `manifests=False` (a page) it reads none and "manifests"
    is None.
    """
    sets: Counter = Counter()
    signed: Counter = Counter()
    passwords: Counter = Counter()
    for backup_set in BackupSet.objects.exclude(status=SetStatus.EXPIRED).select_related("cluster"):
        if backup_set.encrypted and backup_set.wrapped_key:
            sets[console_keys.canonical_key_id(wrapped_key_id(backup_set.wrapped_key))] += 1
        if not manifests or backup_set.status in SetStatus.ACTIVE:
            continue
        key = manifest_key(set_prefix(backup_set))
        for _name, storage in set_targets(backup_set):
            found = _read_manifest(storage, key)
            if found is not None and found[1]:
                signed[manifest_signer_id(found[1]) or "unknown"] += 1
    for token in Instance.objects.exclude(password_encrypted="").values_list(
        "password_encrypted", flat=True
    ):
        passwords[console_keys.secret_key_id(token) or "unknown"] += 1
    ids = console_keys.known_key_ids()
    ids += sorted((set(sets) | set(signed) | set(passwords)) - set(ids))
    return {
        "current": console_keys.current_key_id(),
        "keys": [
            {
                "id": kid,
                "sets": sets[kid],
                "passwords": passwords[kid],
                "manifests": signed[kid] if manifests else None,
            }
            for kid in ids
        ],
    }


@dataclass
class RotationCounts:
    sets: int = 0
    passwords: int = 0
    manifests: int = 0
    skipped_running: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "sets": self.sets,
            "passwords": self.passwords,
            "manifests": self.manifests,
            "skipped_running": self.skipped_running,
            "problems": list(self.problems),
        }


def _password_rotate(instance_id: int, current: str) -> bool:
    with transaction.atomic():
        instance = Instance.objects.select_for_update().get(pk=instance_id)
        token = instance.password_encrypted
        if not token or (token.startswith("sv2.") and console_keys.secret_key_id(token) == current):
            return False
        instance.password_encrypted = console_keys.encrypt_secret(
            console_keys.decrypt_secret(token)
        )
        instance.save(update_fields=["password_encrypted"])
    return True


def _wrapped_key_rotate(set_id: int, current: str) -> tuple[BackupSet, bool]:
    """Rewrap the set's data key under the current key (row first: the manifest copy follows
    and opens either way while the old key is configured)."""
    with transaction.atomic():
        backup_set = lock_set(set_id)
        if not (backup_set.encrypted and backup_set.wrapped_key):
            return backup_set, False
        rewrapped = console_keys.data_key_rewrap(backup_set.wrapped_key)
        changed = rewrapped != backup_set.wrapped_key or backup_set.key_id != current
        if changed:
            backup_set.wrapped_key = rewrapped
            backup_set.key_id = current
            backup_set.save(update_fields=["wrapped_key", "key_id"])
    return backup_set, changed


def _manifest_current(backup_set: BackupSet, doc: dict, current: str) -> bool:
    if manifest_signer_id(doc) != current or manifest_signing_key_id(doc) != current:
        return False
    if backup_set.encrypted and backup_set.wrapped_key:
        encryption = doc.get("encryption") or {}
        return encryption.get("wrapped_key") == backup_set.wrapped_key
    return True


def manifest_resign(backup_set: BackupSet, storage: Storage, *, current: str) -> str | None:
    """Re-sign the set's manifest on one target with the current key (and give it the set's
    current wrapped key). Returns the sha256 of the manifest the target now holds, or None
    when it holds none. EngineError when its manifest verifies with no configured key (it
    is left as it is)."""
    key = manifest_key(set_prefix(backup_set))
    staged = key + NEW_SUFFIX
    found = _read_manifest(storage, key)
    if found is None:
        if storage.exists(staged):
            # A crash between a replace and its clean-up cannot leave this: a staged
            # manifest without its original was never ours to promote.
            log.warning("set %s: a staged manifest without a manifest is left alone", backup_set.pk)
        return None
    data, doc = found
    keyring = console_keys.manifest_hmac_key()
    if not doc:
        raise EngineError(f"{key} is not a JSON object")
    manifest_verify(doc, keyring)
    if _manifest_current(backup_set, doc, current):
        if storage.exists(staged):
            storage.delete(staged)
        return _sha256(data)
    fresh = dict(doc)
    if backup_set.encrypted and backup_set.wrapped_key:
        fresh["encryption"] = manifest_encryption(
            key_id=current, wrapped_key=backup_set.wrapped_key
        )
    new_data = manifest_bytes(manifest_sign(fresh, keyring))
    stored = storage.put_bytes(staged, new_data)
    check = json.loads(storage.get_bytes(staged, expect_sha256=stored.sha256).decode("utf-8"))
    manifest_verify(check, console_keys.keys.manifest_hmac_key(console_keys.master_key()))
    replaced = storage.put_bytes(key, new_data)
    storage.get_bytes(key, expect_sha256=replaced.sha256)
    storage.delete(staged)
    return replaced.sha256


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _set_rotate(backup_set_id: int, current: str, counts: RotationCounts) -> None:
    backup_set, rewrapped = _wrapped_key_rotate(backup_set_id, current)
    counts.sets += int(rewrapped)
    default_sha = None
    for index, (name, storage) in enumerate(set_targets(backup_set)):
        key = manifest_key(set_prefix(backup_set))
        before = _read_manifest(storage, key)
        try:
            sha = manifest_resign(backup_set, storage, current=current)
        except Exception as exc:  # noqa: BLE001 - one bad target must not stop the rest
            counts.problems.append(f"set {backup_set.pk} on {name}: {exc}")
            continue
        if before is not None and sha is not None and _sha256(before[0]) != sha:
            counts.manifests += 1
        if index == 0:
            default_sha = sha
    if default_sha and default_sha != backup_set.manifest_sha256:
        # The row follows the default target's object, so the two agree again.
        BackupSet.objects.filter(pk=backup_set.pk).update(manifest_sha256=default_sha)


def keys_rotate(*, actor=None) -> dict:
    """Move everything to the current master key: rewrap every set's data key, re-encrypt
    every stored password, re-sign every manifest on every target. Resumable and
    idempotent; one audit event with the counts. Returns `keys_status()` plus "rotated"."""
    try:
        current = console_keys.current_key_id()
    except (EngineError, KeyMaterialError) as exc:
        raise EngineError(f"SHARDVAULT_DATA_KEY cannot be used: {exc}") from None
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    counts = RotationCounts()
    for instance_id in (
        Instance.objects.exclude(password_encrypted="").order_by("pk").values_list("pk", flat=True)
    ):
        try:
            counts.passwords += int(_password_rotate(instance_id, current))
        except KeyMaterialError as exc:
            counts.problems.append(f"instance {instance_id}: {exc}")
    counts.skipped_running = (
        BackupSet.objects.filter(status__in=SetStatus.ACTIVE).exclude(wrapped_key="").count()
    )
    for set_id in _rotatable_sets().values_list("pk", flat=True):
        try:
            _set_rotate(set_id, current, counts)
        except EngineError as exc:
            counts.problems.append(f"set {set_id}: {exc}")
        if pause:
            time.sleep(pause)
    audit_record(
        actor=actor,
        action="keys.rotate",
        object_type="key",
        object_id=current,
        object_repr=f"master key {current}",
        details={"current": current, **counts.as_dict()},
    )
    return {**keys_status(), "rotated": counts.as_dict()}
