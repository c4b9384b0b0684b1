"""RQ jobs for incremental sets (queue `backups`) and continuous capture (queue `default`):
load ids, call one service."""

from __future__ import annotations

from django.db import close_old_connections

from backups.models import BackupSet
from backups.services import incrementals, schedules


def run_incremental_job(set_id: int) -> str:
    """Queue `backups`, job id `backup-<set_id>`: capture the set if it is still pending."""
    close_old_connections()
    backup_set = BackupSet.objects.filter(pk=set_id).first()
    if backup_set is None:
        return "gone"
    return incrementals.incremental_execute(backup_set=backup_set).status


def continuous_capture_job(cluster_id: int) -> str:
    """A job armed by an earlier version (queue `default`): continuous capture is now a
    schedule of the policy (`backups.services.schedules`), so this only arms that."""
    close_old_connections()
    schedules.schedules_arm(cluster_ids=[cluster_id])
    return "continuous capture follows the policy's schedule"
