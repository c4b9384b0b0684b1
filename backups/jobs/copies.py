"""RQ job copying a succeeded set to one storage target (queue `backups`, `copy-<set>-<target>`)."""

from __future__ import annotations

from backups.services.copies import set_copy_execute


def set_copy_job(set_id: int, target: str) -> str:
    """Copy one set to one target; a failed attempt raises so RQ retries it with backoff."""
    return set_copy_execute(set_id=set_id, target=target).state
