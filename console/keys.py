"""The console's master keys (settings.SHARDVAULT_DATA_KEY, the current one, and
settings.SHARDVAULT_OLD_DATA_KEYS, earlier ones kept only to read) bound to the engine's
key functions.

Read at call time, never at import. Everything here is a thin wrapper over
`backups.engine.keys`, which takes the keys as arguments. Whatever these functions make
is made with the current key; whatever they read is opened with the key its id names.
"""

from __future__ import annotations

from django.conf import settings

from backups.engine import keys


def master_key() -> str:
    return settings.SHARDVAULT_DATA_KEY


def old_master_keys() -> list[str]:
    """The earlier master keys (read-only), in the order the environment lists them."""
    return [k for k in getattr(settings, "SHARDVAULT_OLD_DATA_KEYS", []) if k]


def all_master_keys() -> list[str]:
    return [master_key(), *old_master_keys()]


def current_key_id() -> str:
    """The id of SHARDVAULT_DATA_KEY (public: safe to show and store)."""
    return keys.master_key_id(master_key())


def known_key_ids() -> list[str]:
    """The ids of the current key and every usable old key, current first."""
    ids = []
    for candidate in all_master_keys():
        try:
            kid = keys.key_id(candidate)
        except Exception:  # noqa: BLE001 - an unusable old key has no id to show
            continue
        if kid not in ids:
            ids.append(kid)
    return ids


def encrypt_secret(plaintext: str) -> str:
    """Encrypt a shard password for storage under the current master key."""
    return keys.encrypt_secret(plaintext, master_key())


def decrypt_secret(token: str) -> str:
    """A stored shard password; KeyMaterialError when no configured key can open it."""
    return keys.decrypt_secret(token, master_key(), older_keys=old_master_keys())


def secret_key_id(token: str) -> str:
    """The id of the key a stored password was encrypted with ("" when unknown)."""
    return keys.secret_key_id(token, all_master_keys())


def canonical_key_id(kid: str) -> str:
    """`kid` in the current id form when a configured key has it (else unchanged)."""
    return keys.canonical_key_id(kid, all_master_keys())


def manifest_hmac_key() -> keys.ManifestKeys:
    """The manifest keys: sign with the current key (its id recorded in the signature),
    check with the key a signature names (EngineError if the current key is unusable)."""
    return keys.manifest_keys(master_key(), old_master_keys())


def data_key_new() -> keys.WrappedDataKey:
    """A fresh data key for one backup set, wrapped under the current master key."""
    return keys.new_wrapped_data_key(master_key())


def data_key_unwrap(wrapped: str) -> bytes:
    """The data key inside `wrapped` (EngineError when no configured key can open it)."""
    return keys.unwrap_data_key(wrapped, master_key(), older_keys=old_master_keys())


def data_key_rewrap(wrapped: str) -> str:
    """`wrapped` re-wrapped under the current master key (unchanged when it already is)."""
    if keys.key_matches(master_key(), keys.wrapped_key_id(wrapped)):
        return wrapped
    return keys.wrap_data_key(data_key_unwrap(wrapped), master_key())
