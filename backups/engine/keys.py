"""Keys: the master key's id, keys derived from it, set data keys, stored secrets.

The master key (SHARDVAULT_DATA_KEY) is always passed in: this module reads no settings.
Each purpose gets its own key through HKDF, so the key that encrypts shard passwords
never signs a manifest.

Data keys for encrypted backup sets are wrapped by the master key.

Every backup set gets a fresh random 256-bit data key. The manifest and the database keep
it only wrapped: AES-256-GCM under a key-encryption key derived from the master key with
HKDF (`derive_key(master, "backup-kek")`), with the master key's public id as
associated data. The key id is recorded beside the wrapped key so that, after a rotation,
the right master key can be found (`unwrap_data_key(..., older_keys=[...])`).

Wrapped form: `sv1.<key-id>.<urlsafe-base64(nonce || ciphertext+tag)>`.

Key ids: the first 8 hex digits of sha256 of the key bytes (`key_id`). Data made before
rotation existed carries the longer legacy id (`legacy_key_id`); readers match a key by
either form, so nothing stored earlier stops opening. Stored passwords are
`sv2.<key-id>.<Fernet token>` (older ones a bare Fernet token, opened by trying each key);
manifest signatures name their key id (`ManifestKeys`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backups.engine.errors import EngineError, KeyMaterialError

DATA_KEY_BYTES = 32
_WRAP_VERSION = "sv1"
_NONCE_BYTES = 12


def decode_master_key(master_key: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(master_key.encode() + b"=" * (-len(master_key) % 4))
    except ValueError as exc:
        raise KeyMaterialError("SHARDVAULT_DATA_KEY is not URL-safe base64") from exc
    if len(raw) != 32:
        raise KeyMaterialError("SHARDVAULT_DATA_KEY must decode to 32 bytes")
    return raw


def derive_key(master_key: str, purpose: str) -> bytes:
    """32 bytes for one purpose ("shard-passwords", "manifest-hmac", "backup-kek")."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"shardvault", info=purpose.encode()
    ).derive(decode_master_key(master_key))


def key_id(master_key: str) -> str:
    """The public id of a master key: the first 8 hex digits of sha256 of its bytes."""
    return hashlib.sha256(decode_master_key(master_key)).hexdigest()[:8]


def legacy_key_id(master_key: str) -> str:
    """The id form data made before key rotation carries (sha256("key-id:" + key)[:16])."""
    return hashlib.sha256(b"key-id:" + decode_master_key(master_key)).hexdigest()[:16]


def key_matches(master_key: str, kid: str) -> bool:
    """True when `kid` (either id form) names `master_key`; False for an unusable key."""
    try:
        return bool(kid) and kid in (key_id(master_key), legacy_key_id(master_key))
    except KeyMaterialError:
        return False


def canonical_key_id(kid: str, keys: Iterable[str]) -> str:
    """`kid` in the current id form when one of `keys` has it (else `kid` unchanged)."""
    for candidate in keys:
        if key_matches(candidate, kid):
            return key_id(candidate)
    return kid


_SECRET_VERSION = "sv2"


def _fernet(master_key: str) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(derive_key(master_key, "shard-passwords")))


def encrypt_secret(plaintext: str, master_key: str) -> str:
    """Encrypt a shard password for storage: `sv2.<key-id>.<Fernet token>` (AES-128-CBC +
    HMAC), the id naming the master key that made it."""
    if not plaintext:
        return ""
    token = _fernet(master_key).encrypt(plaintext.encode()).decode()
    return f"{_SECRET_VERSION}.{key_id(master_key)}.{token}"


def secret_key_id(token: str, keys: Iterable[str] = ()) -> str:
    """The id of the key that encrypted `token` ("" for none; an old bare Fernet token is
    opened with each of `keys` to find it, "" when none opens it)."""
    if not token:
        return ""
    parts = token.split(".")
    if len(parts) == 3 and parts[0] == _SECRET_VERSION:
        return canonical_key_id(parts[1], keys)
    for candidate in keys:
        try:
            _fernet(candidate).decrypt(token.encode())
        except (InvalidToken, KeyMaterialError):
            continue
        return key_id(candidate)
    return ""


def decrypt_secret(token: str, master_key: str, *, older_keys: Iterable[str] = ()) -> str:
    """The plaintext of `encrypt_secret`, opened with the key its id names among
    `master_key` and `older_keys` (an old token without an id: with each key in turn).

    KeyMaterialError when no given key opens it."""
    if not token:
        return ""
    candidates = [master_key, *older_keys]
    parts = token.split(".")
    if len(parts) == 3 and parts[0] == _SECRET_VERSION:
        kid, body = parts[1], parts[2]
        candidates = [k for k in candidates if key_matches(k, kid)]
    else:
        kid, body = "", token
    for candidate in candidates:
        try:
            return _fernet(candidate).decrypt(body.encode()).decode()
        except (InvalidToken, KeyMaterialError):
            continue
    named = f" (key id {kid})" if kid else ""
    raise KeyMaterialError(
        f"a stored password cannot be decrypted with SHARDVAULT_DATA_KEY or "
        f"SHARDVAULT_OLD_DATA_KEYS{named}"
    )


def manifest_hmac_key(master_key: str) -> bytes:
    """The manifest signing key derived from `master_key` (EngineError if it is unusable)."""
    try:
        return derive_key(master_key, "manifest-hmac")
    except KeyMaterialError as exc:
        raise EngineError(str(exc)) from exc


@dataclass(frozen=True)
class ManifestKeys:
    """The keys manifests are signed and checked with: `signing` (with its id) signs; a
    signature that names a key id is checked with that key only, one without an id (made
    before rotation existed) with each key in turn."""

    signing: bytes
    signing_id: str = ""
    by_id: dict = field(default_factory=dict)  # key id (either form) -> hmac key
    candidates: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.signing)

    def for_id(self, kid: str) -> list[bytes]:
        if not kid:
            return list(self.candidates) or [self.signing]
        found = self.by_id.get(kid)
        return [found] if found else []


def manifest_keys(master_key: str, older_keys: Iterable[str] = ()) -> ManifestKeys:
    """ManifestKeys signing with `master_key` and checking with it and every usable older
    key (EngineError when the current key itself is unusable)."""
    signing = manifest_hmac_key(master_key)
    by_id: dict[str, bytes] = {}
    candidates = [signing]
    for candidate in (master_key, *older_keys):
        try:
            hmac_key = derive_key(candidate, "manifest-hmac")
            ids = (key_id(candidate), legacy_key_id(candidate))
        except KeyMaterialError:
            continue
        for kid in ids:
            by_id.setdefault(kid, hmac_key)
        if hmac_key not in candidates:
            candidates.append(hmac_key)
    return ManifestKeys(
        signing=signing,
        signing_id=key_id(master_key),
        by_id=by_id,
        candidates=tuple(candidates),
    )


@dataclass(frozen=True)
class WrappedDataKey:
    """A fresh data key with what the manifest records about it."""

    data_key: bytes
    key_id: str
    wrapped_key: str


def new_data_key() -> bytes:
    """32 random bytes from the operating system's CSPRNG."""
    return os.urandom(DATA_KEY_BYTES)


def master_key_id(master_key: str) -> str:
    """The public fingerprint of a master key (safe to store and show)."""
    try:
        return key_id(master_key)
    except KeyMaterialError as exc:
        raise EngineError(str(exc)) from exc


def _kek(master_key: str) -> bytes:
    try:
        return derive_key(master_key, "backup-kek")
    except KeyMaterialError as exc:
        raise EngineError(str(exc)) from exc


def _aad(kid: str) -> bytes:
    return f"shardvault-data-key:{_WRAP_VERSION}:{kid}".encode()


def wrap_data_key(data_key: bytes, master_key: str) -> str:
    """Encrypt `data_key` under the master key; the result is text safe to store anywhere."""
    if len(data_key) != DATA_KEY_BYTES:
        raise EngineError(f"a data key must be {DATA_KEY_BYTES} bytes, got {len(data_key)}")
    kid = master_key_id(master_key)
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(_kek(master_key)).encrypt(nonce, data_key, _aad(kid))
    encoded = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
    return f"{_WRAP_VERSION}.{kid}.{encoded}"


def wrapped_key_id(wrapped: str) -> str:
    """The id of the master key that wrapped `wrapped` ("" if the text is not a wrapped key)."""
    parts = (wrapped or "").split(".")
    return parts[1] if len(parts) == 3 and parts[0] == _WRAP_VERSION else ""


def unwrap_data_key(wrapped: str, master_key: str, *, older_keys: Iterable[str] = ()) -> bytes:
    """The data key inside `wrapped`, using `master_key` or, after rotation, an older key.

    Refuses (EngineError, one sentence) when no given master key opens it.
    """
    parts = (wrapped or "").split(".")
    if len(parts) != 3 or parts[0] != _WRAP_VERSION:
        raise EngineError("the backup's wrapped data key is malformed or of an unknown version")
    kid, encoded = parts[1], parts[2]
    try:
        blob = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise EngineError("the backup's wrapped data key is malformed") from None
    # The key id is bound into the associated data, so only a key with that id can open it.
    for candidate in (master_key, *older_keys):
        if not key_matches(candidate, kid):
            continue
        try:
            data_key = AESGCM(_kek(candidate)).decrypt(
                blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(kid)
            )
        except (InvalidTag, ValueError):
            continue
        if len(data_key) == DATA_KEY_BYTES:
            return data_key
    current = _safe_id(master_key)
    detail = (
        f"key id {kid}"
        if key_matches(master_key, kid)
        else f"key id {kid}; the current key id is {current}"
    )
    raise EngineError(
        f"the backup's data key cannot be unwrapped with the current SHARDVAULT_DATA_KEY ({detail})"
    )


def _safe_id(master_key: str) -> str:
    try:
        return key_id(master_key)
    except KeyMaterialError:
        return ""


def new_wrapped_data_key(master_key: str) -> WrappedDataKey:
    """A fresh data key for one backup set, with its wrapped form and the master key id."""
    data_key = new_data_key()
    return WrappedDataKey(
        data_key=data_key,
        key_id=master_key_id(master_key),
        wrapped_key=wrap_data_key(data_key, master_key),
    )
