"""One status type per lifecycle, each owning its ACTIVE and FINAL sets.

Code and templates ask the status (`SetStatus.is_active(value)`, `obj.is_active`) instead of
comparing strings or keeping tuples of their own. The values are the ones stored in the
database and shown in the command line's JSON: never rename one.
"""

from __future__ import annotations

from django.db import models


class Lifecycle(models.TextChoices):
    """A TextChoices whose subclasses name their ACTIVE and FINAL members (see `lifecycle`)."""

    @classmethod
    def is_active(cls, value: str) -> bool:
        return value in cls.ACTIVE  # type: ignore[attr-defined]

    @classmethod
    def is_final(cls, value: str) -> bool:
        return value in cls.FINAL  # type: ignore[attr-defined]


def lifecycle(*, active: tuple[str, ...], final: tuple[str, ...]):
    """Class decorator: attach ACTIVE and FINAL (frozensets of members) to a Lifecycle."""

    def attach(cls):
        cls.ACTIVE = frozenset(cls(v) for v in active)
        cls.FINAL = frozenset(cls(v) for v in final)
        return cls

    return attach


@lifecycle(active=("pending", "running"), final=("succeeded", "failed", "cancelled", "expired"))
class SetStatus(Lifecycle):
    """A BackupSet: queued, running, then ended; `expired` once retention removed its objects."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@lifecycle(active=("pending", "running"), final=("succeeded", "failed", "cancelled"))
class PartStatus(Lifecycle):
    """One shard's or one table's part of a set (ShardBackup, TableBackup)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@lifecycle(active=("pending", "running"), final=("succeeded", "failed", "cancelled"))
class RunStatus(Lifecycle):
    """A RestoreRun: the execution of an approved request."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@lifecycle(active=("pending", "running"), final=("succeeded", "failed", "cancelled"))
class ResultStatus(Lifecycle):
    """One restored table of a run (RestoreTableResult)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@lifecycle(active=("pending", "running"), final=("succeeded", "failed", "cancelled"))
class VerificationStatus(Lifecycle):
    """A VerificationRun (storage check or drill)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@lifecycle(
    active=("pending_approval", "approved", "running"),
    final=("rejected", "expired", "succeeded", "cancelled"),
)
class RequestState(Lifecycle):
    """A RestoreRequest: filed, decided, run. `failed` is neither: its run may be resumed."""

    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@lifecycle(active=("pending", "copying"), final=("complete", "failed"))
class CopyStatus(Lifecycle):
    """One set's copy on one storage target (SetCopy): `failed` only after its last retry."""

    PENDING = "pending"
    COPYING = "copying"
    COMPLETE = "complete"
    FAILED = "failed"
