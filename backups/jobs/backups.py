"""RQ jobs for backups: thin wrappers that load ids and call one service."""

from __future__ import annotations

import logging

from django.db import close_old_connections

from backups.models import BackupSet
from backups.services import backups as backup_services

log = logging.getLogger(__name__)


def run_backup_job(set_id: int) -> str:
    """Queue `backups`, job id `backup-<set_id>`: run the set if it is still pending."""
    from rq import get_current_job

    close_old_connections()
    backup_set = BackupSet.objects.filter(pk=set_id).first()
    if backup_set is None:
        return "gone"
    job = get_current_job()

    def on_progress(progress: dict) -> None:
        if job is not None:
            job.meta["progress"] = progress
            job.save_meta()

    return backup_services.backup_execute(
        backup_set=backup_set,
        on_progress=on_progress,
        runner_job_id=job.id if job is not None else backup_services.job_id_for(set_id),
    ).status


def run_backup_job_failed(job, connection, exc_type, exc_value, traceback) -> None:
    """RQ failure callback (an exception, a killed work horse, or an abandoned job)."""
    close_old_connections()
    try:
        set_id = int(job.args[0])
    except (IndexError, TypeError, ValueError):
        return
    reason = f"{exc_type.__name__}: {exc_value}" if exc_type else "the job was abandoned"
    backup_services.backup_fail_from_job_failure(set_id=set_id, reason=reason)


def housekeeping_job() -> int:
    """Queue `default`, every JOB_HEARTBEAT_STALE_SECONDS: fail sets whose worker died."""
    close_old_connections()
    reaped = backup_services.backups_reap_stale()
    active = BackupSet.objects.filter(status__in=backup_services.ACTIVE).exists()
    if active:
        # Reschedule only while something may still die; backup_start schedules it again.
        backup_services.housekeeping_ensure_scheduled()
    return len(reaped)
