"""Storage targets: named places that hold a set (DESIGN.md "Storage targets and copies").

`default` is STORAGE_URL (+ S3_ENDPOINT_URL), where backups are written; it has no row. Other
targets are StorageTarget rows, added by admins (`storage_target_add`). A set's copies live
under the same keys (`<cluster>/<set-id>/...`) on each target.

* `storage_target_names()`: every name a policy's `copy_to` may use.
* `storage_for_target(name)`: the backend of one target.
* `set_read_targets(set)`: where a set can be read from, default first, then its complete
  copies in the policy's `copy_to` order; `set_read_storage(set)` wraps them in a
  FallbackStorage. `set_all_targets(set)`: every target holding any object of the set
  (retention and the orphan sweep delete from all of them).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from django.db import IntegrityError as DatabaseIntegrityError
from django.db import transaction

from backups.engine.errors import EngineError
from backups.engine.manifest import manifest_key, manifest_read
from backups.models import BackupPolicy, BackupSet, SetCopy, StorageTarget
from backups.services.errors import BackupError
from backups.services.sets import default_storage, set_manifest_binding, set_prefix, set_storage
from backups.status import CopyStatus
from backups.storage import Storage, StorageError, storage_from_url
from backups.storage.fallback import FallbackStorage
from console.audit import audit_record
from console.keys import manifest_hmac_key
from console.roles import ADMIN, require_role

DEFAULT_TARGET = "default"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
S3_OPTIONS = (
    "sse",
    "sse_kms_key_id",
    "storage_class",
    "region",
    "addressing_style",
    "max_attempts",
)


class StorageTargetError(BackupError):
    """A storage target that cannot be added or used: one sentence for the user."""


def storage_target_url(target: StorageTarget) -> str:
    """The target's URL with its S3 options as query parameters (what storage_from_url takes)."""
    if not target.options:
        return target.url
    parts = urlsplit(target.url)
    query = dict(parse_qsl(parts.query))
    query.update({k: str(v) for k, v in sorted(target.options.items())})
    return urlunsplit(parts._replace(query=urlencode(query)))


def _check_url(url: str) -> None:
    parts = urlsplit(url or "")
    if parts.scheme not in ("file", "s3"):
        raise StorageTargetError(
            f"storage URL {url!r} is not supported (use file:///absolute/path or s3://bucket/prefix)"
        )
    if "@" in parts.netloc or parts.password is not None:
        raise StorageTargetError(
            "a storage URL must not carry credentials; S3 credentials come from boto3's "
            "usual chain (environment, profile or instance role)"
        )


def storage_target_add(
    *,
    name: str,
    url: str,
    endpoint: str = "",
    options: dict | None = None,
    user,
    check_reachable: bool = False,
) -> StorageTarget:
    """Add a storage target (admins only), audited.

    Refuses a name that is not lowercase letters, digits, `-` and `_` (starting with a
    letter), the reserved name `default`, a duplicate name, a URL that is not `file://` or
    `s3://` or carries credentials, an endpoint that is not http(s), unknown S3 options and
    options on a `file://` target. With `check_reachable`, lists the target once first.
    """
    require_role(user, ADMIN, action="add storage targets")
    name = (name or "").strip()
    if not NAME_PATTERN.match(name):
        raise StorageTargetError(
            f"storage target name {name!r} must be 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter"
        )
    if name == DEFAULT_TARGET:
        raise StorageTargetError("the storage target 'default' is STORAGE_URL; choose another name")
    _check_url(url)
    endpoint = (endpoint or "").strip()
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise StorageTargetError(f"endpoint {endpoint!r} must be an http:// or https:// URL")
    options = dict(options or {})
    unknown = sorted(set(options) - set(S3_OPTIONS))
    if unknown:
        raise StorageTargetError(
            f"unknown storage option {unknown[0]!r} (known: {', '.join(S3_OPTIONS)})"
        )
    scheme = urlsplit(url).scheme
    if scheme == "file" and (options or endpoint):
        raise StorageTargetError("a file:// target takes no endpoint and no S3 options")
    target = StorageTarget(name=name, url=url, endpoint=endpoint, options=options)
    try:
        storage = storage_from_url(storage_target_url(target), endpoint_url=endpoint or None)
    except EngineError as exc:
        raise StorageTargetError(str(exc)) from None
    if check_reachable:
        try:
            next(iter(storage.list("")), None)
        except EngineError as exc:
            raise StorageTargetError(f"storage target {name} is not reachable: {exc}") from None
    try:
        with transaction.atomic():
            if StorageTarget.objects.select_for_update().filter(name=name).exists():
                raise StorageTargetError(f"a storage target named {name} already exists")
            target.created_by = user
            target.save()
            audit_record(
                actor=user,
                action="storage.target_add",
                obj=target,
                details={"name": name, "url": storage.describe(), "endpoint": endpoint},
            )
    except DatabaseIntegrityError:
        raise StorageTargetError(f"a storage target named {name} already exists") from None
    return target


def storage_target_names() -> set[str]:
    """Every target name (`default` included): what a policy's `copy_to` may name."""
    return {DEFAULT_TARGET, *StorageTarget.objects.values_list("name", flat=True)}


def storage_targets_all() -> list[tuple[str, Storage]]:
    """Every configured (target name, storage), default first: what the orphan sweep walks."""
    targets = [(DEFAULT_TARGET, default_storage())]
    for name in StorageTarget.objects.order_by("name").values_list("name", flat=True):
        targets.append((name, storage_for_target(name)))
    return targets


def storage_targets_list() -> list[dict]:
    """`storage list --json`'s targets: default first, then by name; never credentials."""
    default = default_storage()
    rows = [{"name": DEFAULT_TARGET, "url": default.url, "default": True, "endpoint": ""}]
    for target in StorageTarget.objects.order_by("name"):
        rows.append(
            {
                "name": target.name,
                "url": target.url,
                "default": False,
                "endpoint": target.endpoint,
                "options": dict(target.options or {}),
            }
        )
    return rows


def storage_for_target(name: str) -> Storage:
    """The backend of target `name` (StorageTargetError when there is none or it is unusable)."""
    if name == DEFAULT_TARGET:
        return default_storage()
    target = StorageTarget.objects.filter(name=name).first()
    if target is None:
        raise StorageTargetError(f"there is no storage target named {name}")
    try:
        # A target's endpoint is its own: empty means AWS, whatever S3_ENDPOINT_URL says.
        return storage_from_url(storage_target_url(target), endpoint_url=target.endpoint or None)
    except EngineError as exc:
        raise StorageTargetError(f"storage target {name} cannot be used: {exc}") from None


def _copy_order(backup_set: BackupSet) -> list[str]:
    policy = BackupPolicy.objects.filter(cluster_id=backup_set.cluster_id).first()
    return list(policy.copy_to or []) if policy is not None else []


def set_target_storage(backup_set: BackupSet, name: str) -> Storage:
    """Where target `name` holds `backup_set` (`default`: where the set was written)."""
    if name == DEFAULT_TARGET:
        return set_storage(backup_set)
    return storage_for_target(name)


def set_read_targets(backup_set: BackupSet) -> list[tuple[str, Storage]]:
    """[(target name, storage)] a set can be read from: `default` (where it was written)
    first, then each target whose copy is complete, in the policy's `copy_to` order (copies
    on targets the policy no longer names follow, by name)."""
    complete = set(
        SetCopy.objects.filter(backup_set=backup_set, state=CopyStatus.COMPLETE).values_list(
            "target", flat=True
        )
    )
    order = [n for n in _copy_order(backup_set) if n in complete]
    order += sorted(complete - set(order) - {DEFAULT_TARGET})
    sources = [(DEFAULT_TARGET, set_storage(backup_set))]
    for name in order:
        try:
            sources.append((name, storage_for_target(name)))
        except StorageTargetError:
            continue  # a target that cannot be built serves nothing; the others still can
    return sources


def set_all_targets(backup_set: BackupSet) -> list[tuple[str, Storage]]:
    """[(target name, storage)] of every target that may hold any object of the set: the
    default and every target a copy was started on, whatever its state."""
    sources = [(DEFAULT_TARGET, set_storage(backup_set))]
    names = SetCopy.objects.filter(backup_set=backup_set).values_list("target", flat=True)
    for name in sorted(set(names) - {DEFAULT_TARGET}):
        try:
            sources.append((name, storage_for_target(name)))
        except StorageTargetError:
            continue
    return sources


def set_read_storage(backup_set: BackupSet, *, target: str = "") -> FallbackStorage:
    """A storage that reads the set with fallback across `set_read_targets` (or, with
    `target`, from that one target only: StorageTargetError when it holds no complete copy)."""
    if not target:
        storage = FallbackStorage(set_read_targets(backup_set))
        _demote_bad_manifests(backup_set, storage)
        return storage
    if target != DEFAULT_TARGET:
        if not SetCopy.objects.filter(backup_set=backup_set, target=target).exists():
            raise StorageTargetError(f"set {backup_set.pk} has no copy on storage target {target}")
    return FallbackStorage([(target, set_target_storage(backup_set, target))])


def _demote_bad_manifests(backup_set: BackupSet, storage: FallbackStorage) -> None:
    """Move targets whose manifest is missing or fails its signature behind the others, so
    the manifest every reader opens first is a good one (and the bad one is on record)."""
    if len(storage.sources) < 2:
        return
    prefix = set_prefix(backup_set)
    bad: list[tuple[str, Exception]] = []
    good = ""
    for name, source in list(storage.sources):
        try:
            manifest_read(source, prefix, manifest_hmac_key(), **set_manifest_binding(backup_set))
        except Exception as exc:  # noqa: BLE001 - any failure: this target's manifest is unusable
            bad.append((name, exc))
            continue
        good = name
        break
    for name, exc in bad:
        storage.record_failure(manifest_key(prefix), name, exc, served_by=good)
        if good:
            storage.demote(name)


def served_records_merge(records) -> dict:
    """One `served_by` from several (a run's owner and its parts): objects per target
    summed, each fallback once."""
    objects: dict[str, int] = {}
    fallbacks: list[dict] = []
    for record in records:
        for name, count in (record or {}).get("objects", {}).items():
            objects[name] = objects.get(name, 0) + count
        fallbacks.extend(f for f in (record or {}).get("fallbacks", []) if f not in fallbacks)
    return {"objects": objects, "fallbacks": fallbacks}


def served_record(storage, *more) -> dict:
    """What a run stores as `served_by`: objects per target and every fallback taken, summed
    over `storage` and `more` (e.g. the storages a PITR read its binlog segments through)."""
    storages = [s for s in (storage, *more) if isinstance(s, FallbackStorage)]
    if not storages:
        return {}
    objects: dict[str, int] = {}
    fallbacks: list[dict] = []
    for s in storages:
        for name, count in s.served_summary().items():
            objects[name] = objects.get(name, 0) + count
        # Each shard's segment storage of one incremental notes the same bad manifest: once.
        fallbacks.extend(f for f in s.failures if f not in fallbacks)
    return {"objects": objects, "fallbacks": fallbacks}


def set_objects_delete_everywhere(backup_set: BackupSet, prefix: str) -> list[str]:
    """Delete `prefix` (the set's objects) on every target holding the set; returns one
    sentence per target where that failed."""
    problems = []
    for name, storage in set_all_targets(backup_set):
        try:
            storage.delete_prefix(prefix)
        except (EngineError, StorageError) as exc:
            problems.append(f"{name}: {exc}")
    return problems
