"""A backup set's storage, data key and manifest: the one place that binds a set to settings.

Every service that reads or writes a set's objects (backups, incrementals, restores,
verification) gets its storage, key and signed manifest here.
"""

from __future__ import annotations

from django.conf import settings

from backups.engine.keys import unwrap_data_key
from backups.engine.manifest import manifest_read
from backups.models import BackupSet
from backups.services.errors import RestoreError
from backups.storage import Storage, storage_from_url
from console.keys import manifest_hmac_key


def storage_for_url(url: str) -> Storage:
    """The backend for a storage URL, with the configured S3 endpoint (StorageError if bad)."""
    return storage_from_url(url, endpoint_url=settings.S3_ENDPOINT_URL)


def default_storage() -> Storage:
    """The storage configured by STORAGE_URL: where new sets are written."""
    return storage_for_url(settings.STORAGE_URL)


def set_storage(backup_set: BackupSet) -> Storage:
    """Where `backup_set` was written."""
    return storage_for_url(backup_set.storage_url or settings.STORAGE_URL)


def set_prefix(backup_set: BackupSet) -> str:
    """`<cluster>/<set-id>`: the set's objects, relative to its storage's prefix."""
    return backup_set.object_prefix or f"{backup_set.cluster.name}/{backup_set.pk}"


def set_data_key(backup_set: BackupSet) -> bytes | None:
    """The set's data key, None when it is not encrypted; EngineError when it cannot be opened."""
    if not backup_set.encrypted:
        return None
    return unwrap_data_key(backup_set.wrapped_key, settings.SHARDVAULT_DATA_KEY)


def set_manifest(backup_set: BackupSet, storage: Storage | None = None) -> dict:
    """The set's manifest, its signature checked; RestoreError when it cannot be read."""
    storage = storage or set_storage(backup_set)
    try:
        return manifest_read(storage, set_prefix(backup_set), manifest_hmac_key())
    except Exception as exc:  # noqa: BLE001 - any failure here means: cannot restore from it
        raise RestoreError(
            f"the manifest of backup set {backup_set.pk} cannot be read: {exc}"
        ) from exc
