"""RQ jobs for full backups (queue `backups`): thin wrappers that load ids and call one service."""

from __future__ import annotations

from django.db import close_old_connections

from backups.models import BackupSet
from backups.queue import CurrentJob
from backups.services.full_backups import backup_execute, backup_fail_from_job_failure
from backups.services.physical import physical_part_execute
from backups.services.sets import set_job_id


def run_backup_job(set_id: int) -> str:
    """Queue `backups`, job id `backup-<set_id>`: run the set if it is still pending."""
    close_old_connections()
    backup_set = BackupSet.objects.filter(pk=set_id).first()
    if backup_set is None:
        return "gone"
    runner_job_id = CurrentJob().id or set_job_id(set_id)
    return backup_execute(backup_set=backup_set, runner_job_id=runner_job_id).status


def run_physical_part(set_id: int, instance_name: str) -> dict:
    """Queue `<agent_queue>` (a host agent, `host-<name>`), job id
    `backup-<set>-physical-<instance>`: copy one instance of a running physical set."""
    close_old_connections()
    return physical_part_execute(set_id=set_id, instance_name=instance_name)


def run_backup_job_failed(job, connection, exc_type, exc_value, traceback) -> None:
    """RQ failure callback (an exception, a killed work horse, or an abandoned job)."""
    close_old_connections()
    try:
        set_id = int(job.args[0])
    except (IndexError, TypeError, ValueError):
        return
    reason = f"{exc_type.__name__}: {exc_value}" if exc_type else "the job was abandoned"
    backup_fail_from_job_failure(set_id=set_id, reason=reason)
