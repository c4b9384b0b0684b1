"""The console's master key (settings.SHARDVAULT_DATA_KEY) bound to the engine's key functions.

Read at call time, never at import. Everything here is a thin wrapper over
`backups.engine.keys`, which takes the key as an argument.
"""

from __future__ import annotations

from django.conf import settings

from backups.engine import keys
from backups.engine.errors import KeyMaterialError

__all__ = ["KeyMaterialError", "decrypt_secret", "encrypt_secret", "manifest_hmac_key"]


def master_key() -> str:
    return settings.SHARDVAULT_DATA_KEY


def encrypt_secret(plaintext: str) -> str:
    """Encrypt a shard password for storage under the current master key."""
    return keys.encrypt_secret(plaintext, master_key())


def decrypt_secret(token: str) -> str:
    """A stored shard password; KeyMaterialError when the current key cannot open it."""
    return keys.decrypt_secret(token, master_key())


def manifest_hmac_key() -> bytes:
    """The manifest signing key of the current master key (EngineError if it is unusable)."""
    return keys.manifest_hmac_key(master_key())
