"""RQ jobs for incremental sets (queue `backups`) and continuous capture (queue `default`):
load ids, call one service."""

from __future__ import annotations

from django.db import close_old_connections

from backups.models import BackupSet
from backups.services import incrementals
from shards.models import Cluster


def run_incremental_job(set_id: int) -> str:
    """Queue `backups`, job id `backup-<set_id>`: capture the set if it is still pending."""
    close_old_connections()
    backup_set = BackupSet.objects.filter(pk=set_id).first()
    if backup_set is None:
        return "gone"
    return incrementals.incremental_execute(backup_set=backup_set).status


def continuous_capture_job(cluster_id: int) -> str:
    """Queue `default`, scheduled every N minutes: start an incremental, schedule the next."""
    close_old_connections()
    cluster = Cluster.objects.filter(pk=cluster_id).first()
    if cluster is None:
        return "gone"
    backup_set = incrementals.continuous_capture_tick(cluster=cluster)
    incrementals.continuous_capture_schedule(cluster=cluster)
    return f"set {backup_set.pk}" if backup_set else "skipped"
