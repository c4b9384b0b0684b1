"""A backup set's storage, data key and manifest: the one place that binds a set to settings.

Every service that reads or writes a set's objects (backups, incrementals, restores,
verification) gets its storage, key and signed manifest here; expiring a set (and the
check that no later set of its chain depends on it) lives here too.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from backups.engine.keys import unwrap_data_key
from backups.engine.manifest import manifest_read
from backups.models import BackupSet
from backups.services.errors import BackupError, ChainError, RestoreError
from backups.status import SetStatus
from backups.storage import Storage, storage_from_url
from console.audit import audit_record
from console.keys import manifest_hmac_key
from console.roles import ADMIN, OPERATOR, require_role

log = logging.getLogger(__name__)


def backup_authorise(actor) -> None:
    """Users need operator or admin; a plain string is a system actor (cli, scheduler)."""
    if hasattr(actor, "pk"):
        require_role(actor, OPERATOR, ADMIN, action="run backups")
    elif not isinstance(actor, str) or not actor:
        raise BackupError("a backup needs an actor (a user or a system name)")


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


# ------------------------------------------------------------------------- expire / delete


def backup_set_delete_check(*, backup_set: BackupSet) -> None:
    """Raise ChainError when a later set depends on `backup_set` (delete and expiry call this)."""
    child = (
        BackupSet.objects.filter(parent=backup_set)
        .exclude(status__in=[SetStatus.FAILED, SetStatus.CANCELLED, SetStatus.EXPIRED])
        .order_by("id")
        .first()
    )
    if child is not None:
        raise ChainError(
            f"set {backup_set.pk} cannot be removed: incremental set {child.pk} depends on it; "
            "remove the later sets of the chain first"
        )


def backup_set_expire(*, backup_set: BackupSet, actor) -> BackupSet:
    """Mark a finished set `expired` and delete its objects (after commit).

    Refused (ChainError) while a later set of its chain depends on it, and for sets that
    are still pending or running. Operators and admins only.
    """
    backup_authorise(actor)
    with transaction.atomic():
        locked = BackupSet.objects.select_for_update().get(pk=backup_set.pk)
        if locked.status in SetStatus.ACTIVE:
            raise ChainError(
                f"set {locked.pk} is {locked.status}; cancel it instead of expiring it"
            )
        if locked.status == SetStatus.EXPIRED:
            return locked
        backup_set_delete_check(backup_set=locked)
        previous = locked.status
        locked.status = SetStatus.EXPIRED
        locked.save(update_fields=["status"])
        audit_record(
            actor=actor,
            action="backup.expired",
            obj=locked,
            details={"previous_status": previous, "kind": locked.kind},
        )
        set_id = locked.pk
        transaction.on_commit(lambda: _delete_objects_quietly(set_id))
    return locked


def _delete_objects_quietly(set_id: int) -> None:
    backup_set = BackupSet.objects.get(pk=set_id)
    try:
        set_storage(backup_set).delete_prefix(backup_set.object_prefix)
    except Exception:  # noqa: BLE001 - the set is expired either way; the log says what is left
        log.exception("deleting the objects of expired set %s failed", set_id)
