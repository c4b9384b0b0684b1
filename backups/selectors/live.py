"""Per-shard live figures for the set page and the restore run page (one poll each)."""

from __future__ import annotations

from collections import defaultdict

from django.core.cache import cache
from django.db.models import Sum

from backups.models import BackupSet, RestoreRun, TableBackup
from backups.services.live_progress import run_shards_cache_key
from backups.status import PartStatus, RunStatus, SetStatus


def _percent(done: int, estimate: int, status: str) -> float | None:
    if status == SetStatus.SUCCEEDED:
        return 100.0
    if not estimate:
        return None
    return min(100.0, 100.0 * done / estimate)


def set_shard_rows(backup_set: BackupSet) -> list[dict]:
    """Each shard of the set: status, rows and bytes so far (final figures once it ended),
    the tables being dumped now and the worker (host:pid) that holds it. Two queries."""
    running = defaultdict(list)
    for shard_backup_id, name in (
        TableBackup.objects.filter(shard_backup__backup_set=backup_set, status=PartStatus.RUNNING)
        .order_by("shard_backup_id", "name")
        .values_list("shard_backup_id", "name")
    ):
        running[shard_backup_id].append(name)
    rows = []
    for sb in backup_set.shard_backups.order_by("shard_name"):
        active = PartStatus.is_active(sb.status)
        done = sb.rows_done if active else max(sb.rows, sb.rows_done)
        nbytes = sb.bytes_done if active else max(sb.raw_bytes, sb.bytes_done)
        rows.append(
            {
                "name": sb.shard_name,
                "instance": sb.instance_name,
                "database": sb.database,
                "status": sb.status,
                "rows": done,
                "rows_estimate": sb.rows_estimate,
                "bytes": nbytes,
                "percent": _percent(done, sb.rows_estimate, sb.status),
                "tables": running.get(sb.pk, []),
                "worker": sb.worker,
            }
        )
    return rows


def run_shard_rows(run: RestoreRun | None) -> list[dict]:
    """Each shard a restore run loads: rows and bytes so far, the table it loads now and
    the worker, from the run's live figures; once the run ended, its results' rows."""
    if run is None:
        return []
    active = RunStatus.is_active(run.status)
    live = cache.get(run_shards_cache_key(run.pk)) or {}
    results = dict(
        run.results.values("shard_name")
        .annotate(total_rows=Sum("rows"))
        .order_by("shard_name")
        .values_list("shard_name", "total_rows")
    )
    rows = []
    for name in sorted(set(live) | set(results)):
        figures = live.get(name, {})
        done = figures.get("rows", 0) if active or name not in results else results[name]
        estimate = figures.get("rows_estimate", 0)
        if not active and name in results:
            percent = 100.0 if run.status == RunStatus.SUCCEEDED else None
        else:
            percent = min(100.0, 100.0 * done / estimate) if estimate else None
        rows.append(
            {
                "name": name,
                "rows": done,
                "rows_estimate": estimate,
                "bytes": figures.get("bytes", 0),
                "percent": percent,
                "table": figures.get("table", "") if active else "",
                "worker": figures.get("worker", ""),
            }
        )
    return rows
