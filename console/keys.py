"""Keys derived from the master data key (SHARDVAULT_DATA_KEY).

Each purpose gets its own key through HKDF, so the key that encrypts shard
passwords never signs a manifest. Plain Python: callers pass the master key,
or use the settings-bound helpers at the bottom.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class KeyError_(Exception):
    pass


def decode_master_key(master_key: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(master_key.encode() + b"=" * (-len(master_key) % 4))
    except ValueError as exc:
        raise KeyError_("SHARDVAULT_DATA_KEY is not URL-safe base64") from exc
    if len(raw) != 32:
        raise KeyError_("SHARDVAULT_DATA_KEY must decode to 32 bytes")
    return raw


def derive_key(master_key: str, purpose: str) -> bytes:
    """32 bytes for one purpose ("shard-passwords", "manifest-hmac", "backup-kek")."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"shardvault", info=purpose.encode()
    ).derive(decode_master_key(master_key))


def key_id(master_key: str) -> str:
    """A short public fingerprint of the master key, recorded so keys can rotate."""
    return hashlib.sha256(b"key-id:" + decode_master_key(master_key)).hexdigest()[:16]


def _settings_master_key() -> str:
    from django.conf import settings

    return settings.SHARDVAULT_DATA_KEY


def encrypt_secret(plaintext: str) -> str:
    """Encrypt a shard password for storage (Fernet: AES-128-CBC + HMAC)."""
    if not plaintext:
        return ""
    key = base64.urlsafe_b64encode(derive_key(_settings_master_key(), "shard-passwords"))
    return Fernet(key).encrypt(plaintext.encode()).decode()


def decrypt_secret(token: str) -> str:
    if not token:
        return ""
    key = base64.urlsafe_b64encode(derive_key(_settings_master_key(), "shard-passwords"))
    try:
        return Fernet(key).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise KeyError_(
            "a stored password cannot be decrypted with the current SHARDVAULT_DATA_KEY"
        ) from exc
