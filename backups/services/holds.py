"""Holds: a set on hold is never removed by retention, nor is its chain.

Who may do what (DESIGN.md leaves the hold itself open; the issue fixes the release):

* **hold**: operators and admins, the people who run backups and restores, may put any set
  that still has its objects on hold (a pending, running, succeeded, failed or cancelled
  one), with a reason;
* **release**: admins only, since a release can let retention delete a backup someone
  needed kept (an operator who placed a hold cannot lift it either).

Both lock the set row, check its state, and write their audit event in the same transaction.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from backups.models import BackupSet
from backups.services.errors import BackupError
from backups.services.sets import lock_set
from backups.status import SetStatus
from console.audit import audit_record
from console.roles import ADMIN, OPERATOR, require_role


def backup_set_hold(*, backup_set: BackupSet, actor, reason: str = "") -> BackupSet:
    """Put `backup_set` on hold (operators, admins). Refused for a set already on hold and
    for one retention removed or is removing (its objects are gone or going)."""
    require_role(actor, OPERATOR, ADMIN, action="put backup sets on hold")
    reason = (reason or "").strip()
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status == SetStatus.EXPIRED or locked.expiring_since is not None:
            done = "was" if locked.status == SetStatus.EXPIRED else "is being"
            raise BackupError(
                f"backup set {locked.pk} {done} removed by retention; there is nothing left to hold"
            )
        if locked.held_at is not None:
            raise BackupError(f"backup set {locked.pk} is already on hold")
        locked.held_at = timezone.now()
        locked.held_by = actor
        locked.hold_reason = reason
        locked.save(update_fields=["held_at", "held_by", "hold_reason"])
        audit_record(actor=actor, action="backup.hold", obj=locked, details={"reason": reason})
    return locked


def backup_set_release(*, backup_set: BackupSet, actor, reason: str = "") -> BackupSet:
    """Lift the hold of `backup_set` (admins only); retention decides about it again."""
    require_role(actor, ADMIN, action="release held backup sets (admins only)")
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.held_at is None:
            raise BackupError(f"backup set {locked.pk} is not on hold")
        details = {
            "reason": (reason or "").strip(),
            "hold_reason": locked.hold_reason,
            "held_by": locked.held_by.get_username() if locked.held_by_id else None,
            "held_at": locked.held_at.isoformat(),
        }
        locked.held_at = None
        locked.held_by = None
        locked.hold_reason = ""
        locked.save(update_fields=["held_at", "held_by", "hold_reason"])
        audit_record(actor=actor, action="backup.release", obj=locked, details=details)
    return locked
