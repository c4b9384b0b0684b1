"""Housekeeping: every reaper and periodic check, in one place.

Run only by the periodic jobs of `backups.queue.PERIODIC` (and `manage.py housekeeping`),
never by a page: a GET changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from backups.services.alerts import alerts_check_failed_backups, alerts_check_rpo
from backups.services.copies import set_copies_requeue
from backups.services.full_backups import backups_reap_stale
from backups.services.restore_requests import restore_requests_expire
from backups.services.restore_runs import restore_runs_resume_stale
from backups.services.verification import (
    verification_backfill_automatic,
    verification_drills_schedule,
    verifications_reap_stale,
)

log = logging.getLogger(__name__)


def _steps(steps: dict[str, Callable[[], Any]]) -> dict:
    """Run every step even when one raises: a broken reaper must not stop restore runs from
    resuming or requests from expiring. A failed step is logged and reported as its error."""
    done: dict[str, Any] = {}
    for name, step in steps.items():
        try:
            done[name] = step()
        except Exception as exc:  # noqa: BLE001 - logged; the next run tries again
            log.exception("housekeeping step %s failed", name)
            done[name] = f"failed: {exc}"
    return done


def housekeeping_reap() -> dict:
    """Fail backups and verifications whose worker died, resume restore runs whose worker
    died, and expire overdue restore requests and approvals (every heartbeat interval)."""
    return _steps(
        {
            "backups_failed": lambda: [s.pk for s in backups_reap_stale()],
            "verifications_failed": lambda: [v.pk for v in verifications_reap_stale()],
            "restores_resumed": restore_runs_resume_stale,
            "requests_expired": restore_requests_expire,
        }
    )


def housekeeping_checks() -> dict:
    """Queue missed storage checks, due drills and unfinished copies; raise RPO and
    failed-backup alerts (hourly)."""
    return _steps(
        {
            "storage_checks": lambda: [c.pk for c in verification_backfill_automatic()],
            "drills": lambda: [d.pk for d in verification_drills_schedule()],
            "rpo_alerts": alerts_check_rpo,
            "failed_backup_alerts": alerts_check_failed_backups,
            "copies_requeued": set_copies_requeue,
        }
    )
