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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

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
    """A short public fingerprint of the master key, recorded so keys can rotate."""
    return hashlib.sha256(b"key-id:" + decode_master_key(master_key)).hexdigest()[:16]


def encrypt_secret(plaintext: str, master_key: str) -> str:
    """Encrypt a shard password for storage (Fernet: AES-128-CBC + HMAC)."""
    if not plaintext:
        return ""
    key = base64.urlsafe_b64encode(derive_key(master_key, "shard-passwords"))
    return Fernet(key).encrypt(plaintext.encode()).decode()


def decrypt_secret(token: str, master_key: str) -> str:
    """The plaintext of `encrypt_secret`; KeyMaterialError when this key cannot open it."""
    if not token:
        return ""
    key = base64.urlsafe_b64encode(derive_key(master_key, "shard-passwords"))
    try:
        return Fernet(key).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise KeyMaterialError(
            "a stored password cannot be decrypted with the current SHARDVAULT_DATA_KEY"
        ) from exc


def manifest_hmac_key(master_key: str) -> bytes:
    """The manifest signing key derived from `master_key` (EngineError if it is unusable)."""
    try:
        return derive_key(master_key, "manifest-hmac")
    except KeyMaterialError as exc:
        raise EngineError(str(exc)) from exc


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
        if _safe_id(candidate) != kid:
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
    detail = f"key id {kid}" if current == kid else f"key id {kid}; the current key id is {current}"
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
