"""Copies of succeeded sets on the policy's `copy_to` storage targets.

After a set succeeds, `set_copies_start` records one pending SetCopy per `copy_to` target
and queues a copy job per target on `backups` (`copy-<set>-<target>`). `set_copy_execute`
copies every object the signed manifest lists, then the manifest last, streaming each one
(get_stream -> put_stream, never a whole object in memory): the read is checked against the
manifest's size and sha256 and the written bytes' sha256 is compared again, so a corrupt or
missing object never becomes a "complete" copy. A failure is retried by RQ after each delay
of COPY_RETRY_SECONDS, then the copy is `failed` and alerts; the set itself never fails.
"""

from __future__ import annotations

import json
import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backups import queue
from backups.engine.manifest import manifest_key, manifest_objects, manifest_verify
from backups.models import BackupPolicy, BackupSet, SetCopy
from backups.services.alerts import alert_copy_failed
from backups.services.errors import BackupError
from backups.services.sets import WORKER_ACTOR, set_prefix
from backups.services.storage_targets import (
    DEFAULT_TARGET,
    set_read_targets,
    storage_for_target,
)
from backups.status import CopyStatus, SetStatus
from backups.storage import Storage
from backups.storage.fallback import FallbackStorage
from console.audit import audit_record
from console.keys import manifest_hmac_key

log = logging.getLogger(__name__)

JOB = "backups.jobs.copies.set_copy_job"


class CopyRetry(BackupError):
    """A copy attempt failed and will be tried again (the job re-raises it for RQ)."""


class CopyIntegrityError(BackupError):
    """What was written to the target is not what the manifest records."""


def set_copy_job_id(set_id: int, target: str) -> str:
    return f"copy-{set_id}-{target}"


def copy_max_attempts() -> int:
    return 1 + len(settings.COPY_RETRY_SECONDS)


def set_copies_start(*, backup_set: BackupSet) -> list[SetCopy]:
    """One pending copy per `copy_to` target of the set's policy, each queued after commit.

    Called once a set has succeeded; a target that already has a copy of the set keeps it.
    """
    policy = BackupPolicy.objects.filter(cluster_id=backup_set.cluster_id).first()
    names = [n for n in (policy.copy_to if policy else []) or [] if n != DEFAULT_TARGET]
    if not names:
        return []
    copies = []
    with transaction.atomic():
        for name in dict.fromkeys(names):
            copy, created = SetCopy.objects.get_or_create(backup_set=backup_set, target=name)
            if not created:
                continue
            copies.append(copy)
        if copies:
            audit_record(
                actor=WORKER_ACTOR,
                action="copy.queued",
                obj=backup_set,
                details={"targets": [c.target for c in copies]},
            )
            pairs = [(backup_set.pk, c.target) for c in copies]
            transaction.on_commit(lambda: _enqueue_all(pairs))
    return copies


def _enqueue_all(pairs: list[tuple[int, str]]) -> None:
    for set_id, target in pairs:
        try:
            queue.enqueue(
                JOB,
                set_id,
                target,
                queue=queue.BACKUPS,
                job_id=set_copy_job_id(set_id, target),
                description=f"copy backup set {set_id} to {target}",
                retry_after=list(settings.COPY_RETRY_SECONDS),
            )
        except Exception:  # noqa: BLE001 - the copy stays pending; set_copies_requeue retries
            log.exception("could not queue the copy of set %s to %s", set_id, target)


def set_copies_after_success(backup_set: BackupSet) -> None:
    """The succeeded transition's on_commit hook: start the copies, never failing the caller."""
    try:
        set_copies_start(backup_set=backup_set)
    except Exception:  # noqa: BLE001 - the set succeeded either way; the copy is retried later
        log.exception("could not start the copies of set %s", backup_set.pk)


def set_copies_requeue() -> list[str]:
    """Queue again the pending copies of succeeded sets, and copies left `copying` by a worker
    that died (housekeeping). Idempotent: a job still waiting, scheduled for its retry or
    running keeps its id and is not queued twice."""
    pairs = []
    active = SetCopy.objects.filter(
        state__in=CopyStatus.ACTIVE, backup_set__status=SetStatus.SUCCEEDED
    ).values_list("backup_set_id", "target")
    for set_id, target in active:
        status = queue.job_status(set_copy_job_id(set_id, target), queue=queue.BACKUPS)
        if status not in queue.LIVE_STATUSES and status != "unknown":
            pairs.append((set_id, target))
    _enqueue_all(pairs)
    return [set_copy_job_id(s, t) for s, t in pairs]


def set_copy_execute(*, set_id: int, target: str) -> SetCopy:
    """Copy set `set_id` to `target` now, in this process (the copy job calls this).

    Idempotent: a complete copy is returned as it is. A failed attempt raises CopyRetry while
    attempts remain; the last one marks the copy `failed`, audits and alerts after commit.
    """
    with transaction.atomic():
        copy = (
            SetCopy.objects.select_for_update()
            .select_related("backup_set__cluster")
            .get(backup_set_id=set_id, target=target)
        )
        if copy.state == CopyStatus.COMPLETE:
            return copy
        backup_set = copy.backup_set
        if backup_set.status != SetStatus.SUCCEEDED:
            copy.state = CopyStatus.FAILED
            copy.error = f"set {set_id} is {backup_set.status}: only succeeded sets are copied"
            copy.finished_at = timezone.now()
            copy.save()
            return copy
        copy.state = CopyStatus.COPYING
        copy.attempts += 1
        copy.started_at = timezone.now()
        copy.finished_at = None
        copy.objects_copied = 0
        copy.bytes = 0
        copy.save()
        audit_record(
            actor=WORKER_ACTOR,
            action="copy.start",
            obj=backup_set,
            details={"target": target, "attempt": copy.attempts},
        )
    try:
        destination = storage_for_target(target)
        sources = [(n, s) for n, s in set_read_targets(backup_set) if n != target]
        objects, size = _copy_objects(backup_set, FallbackStorage(sources), destination, copy)
    except Exception as exc:  # noqa: BLE001 - any failure: record it, retry or alert
        return _copy_failed(copy.pk, str(exc) or exc.__class__.__name__)
    with transaction.atomic():
        copy = SetCopy.objects.select_for_update().get(pk=copy.pk)
        copy.state = CopyStatus.COMPLETE
        copy.objects_copied = objects
        copy.bytes = size
        copy.error = ""
        copy.finished_at = timezone.now()
        copy.save()
        audit_record(
            actor=WORKER_ACTOR,
            action="copy.complete",
            obj=backup_set,
            details={"target": target, "objects": objects, "bytes": size},
        )
    return copy


def _copy_one(source: Storage, destination: Storage, key: str, sha256, size) -> int:
    stored = destination.put_stream(
        key, source.get_stream(key, expect_sha256=sha256 or None, expect_size=size)
    )
    if sha256 and stored.sha256 != sha256:
        raise CopyIntegrityError(
            f"{key} was written to the target with sha256 {stored.sha256}, "
            f"the manifest records {sha256}"
        )
    info = destination.head(key)
    if info is None or info.size != stored.size:
        raise CopyIntegrityError(f"{key} is not on the target after it was written")
    return stored.size


def _copy_objects(
    backup_set: BackupSet, source: FallbackStorage, destination: Storage, copy: SetCopy
) -> tuple[int, int]:
    prefix = set_prefix(backup_set)
    key = manifest_key(prefix)
    manifest_bytes, doc = _verified_manifest(source, key)
    objects = total = 0
    for entry in manifest_objects(doc):
        total += _copy_one(
            source, destination, entry["key"], entry.get("sha256"), entry.get("stored_bytes")
        )
        objects += 1
        if objects % 50 == 0:
            SetCopy.objects.filter(pk=copy.pk).update(objects_copied=objects, bytes=total)
    # The manifest goes last: a target with a manifest holds every object it lists.
    stored = destination.put_bytes(key, manifest_bytes)
    if destination.get_bytes(key, expect_sha256=stored.sha256) != manifest_bytes:
        raise CopyIntegrityError(f"{key} does not read back as written")
    return objects + 1, total + stored.size


def _verified_manifest(source: FallbackStorage, key: str) -> tuple[bytes, dict]:
    """The manifest's bytes from the first source where it parses and its signature holds."""
    errors = []
    for name, storage in source.sources:
        try:
            data = storage.get_bytes(key)
            doc = json.loads(data.decode("utf-8"))
            manifest_verify(doc, manifest_hmac_key())
            return data, doc
        except Exception as exc:  # noqa: BLE001 - try the next target
            errors.append(f"{name}: {exc}")
    raise CopyIntegrityError(f"no target holds a valid manifest {key} ({'; '.join(errors)})")


def _copy_failed(copy_id: int, error: str) -> SetCopy:
    with transaction.atomic():
        copy = SetCopy.objects.select_for_update().select_related("backup_set").get(pk=copy_id)
        copy.error = error[:2000]
        final = copy.attempts >= copy_max_attempts()
        copy.state = CopyStatus.FAILED if final else CopyStatus.PENDING
        copy.finished_at = timezone.now() if final else None
        copy.save()
        audit_record(
            actor=WORKER_ACTOR,
            action="copy.fail" if final else "copy.retry",
            obj=copy.backup_set,
            details={"target": copy.target, "attempt": copy.attempts, "error": copy.error},
        )
        if final:
            transaction.on_commit(lambda: _alert(copy_id))
    if not final:
        raise CopyRetry(
            f"copy of set {copy.backup_set_id} to {copy.target} failed "
            f"(attempt {copy.attempts} of {copy_max_attempts()}): {error}"
        )
    return copy


def _alert(copy_id: int) -> None:
    try:
        alert_copy_failed(SetCopy.objects.select_related("backup_set__cluster").get(pk=copy_id))
    except Exception:  # noqa: BLE001 - the failure is recorded on the copy either way
        log.exception("alerting about failed copy %s failed", copy_id)
