"""The console's master key (settings.SHARDVAULT_DATA_KEY) bound to the engine's key functions.

Read at call time, never at import. Everything here is a thin wrapper over
`backups.engine.keys`, which takes the key as an argument.
"""

from __future__ import annotations

from django.conf import settings

from backups.engine import keys


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


def data_key_new() -> keys.WrappedDataKey:
    """A fresh data key for one backup set, wrapped under the current master key."""
    return keys.new_wrapped_data_key(master_key())


def data_key_unwrap(wrapped: str) -> bytes:
    """The data key inside `wrapped` (EngineError when the current key cannot open it)."""
    return keys.unwrap_data_key(wrapped, master_key())
