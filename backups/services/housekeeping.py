"""Housekeeping: every reaper and periodic check, in one place.

Run only by the periodic jobs of `backups.queue.PERIODIC` (and `manage.py housekeeping`),
never by a page: a GET changes nothing.
"""

from __future__ import annotations

import logging

from backups.services.alerts import alerts_check_failed_backups, alerts_check_rpo
from backups.services.full_backups import backups_reap_stale
from backups.services.restore_requests import restore_requests_expire
from backups.services.restore_runs import restore_runs_resume_stale
from backups.services.verification import (
    verification_backfill_automatic,
    verification_drills_schedule,
    verifications_reap_stale,
)

log = logging.getLogger(__name__)


def housekeeping_reap() -> dict:
    """Fail backups and verifications whose worker died, resume restore runs whose worker
    died, and expire overdue restore requests and approvals (every heartbeat interval)."""
    return {
        "backups_failed": [s.pk for s in backups_reap_stale()],
        "verifications_failed": [v.pk for v in verifications_reap_stale()],
        "restores_resumed": restore_runs_resume_stale(),
        "requests_expired": restore_requests_expire(),
    }


def housekeeping_checks() -> dict:
    """Queue missed storage checks and due drills; raise RPO and failed-backup alerts (hourly)."""
    return {
        "storage_checks": [c.pk for c in verification_backfill_automatic()],
        "drills": [d.pk for d in verification_drills_schedule()],
        "rpo_alerts": alerts_check_rpo(),
        "failed_backup_alerts": alerts_check_failed_backups(),
    }
