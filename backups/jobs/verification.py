"""RQ job for verification (queue `verify`), enqueued by dotted path from the service."""

from __future__ import annotations

from backups.services.verification import verification_execute, verification_summary


def verification_job(verification_id: int) -> dict:
    """Run one verification; idempotent (a run that is no longer pending is left alone)."""
    return verification_summary(verification_execute(verification_id=verification_id))
