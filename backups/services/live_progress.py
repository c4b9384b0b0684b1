"""Live per-shard progress of a restore run, for the run page's one poll.

A restore run's rows are counted by its JobTracker; this hook (the tracker's `on_flush`,
at most once a second) keeps each shard's rows, bytes, current table and worker in the
cache. It is ephemeral by design: once the run ends its per-table results are the record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from django.core.cache import cache

from backups.engine.types import ProgressEvent
from backups.services.progress import ProgressSnapshot, worker_name

CACHE_SECONDS = 24 * 3600


def run_shards_cache_key(run_id: int) -> str:
    return f"shardvault:restore-run-shards:{run_id}"


class RunShardProgress:
    """`on_flush` hook of a restore run's tracker: the shards' live figures into the cache."""

    def __init__(self, run_id: int) -> None:
        self.key = run_shards_cache_key(run_id)
        self.worker = worker_name()
        self.current: dict[str, str] = {}

    def __call__(self, snapshot: ProgressSnapshot) -> None:
        for shard, table in sorted(snapshot.changed_tables):
            self.current[shard] = table
        estimates: dict[str, int] = {}
        for (shard, _table), figures in snapshot.tables.items():
            estimates[shard] = estimates.get(shard, 0) + figures[2]
        shards = {
            shard: {
                "rows": figures[0],
                "bytes": figures[1],
                "rows_estimate": estimates.get(shard, 0),
                "table": self.current.get(shard, ""),
                "worker": self.worker,
            }
            for shard, figures in snapshot.shards.items()
        }
        try:
            cache.set(self.key, shards, CACHE_SECONDS)
        except Exception:  # noqa: BLE001 - a page's live figures never break a restore
            pass


def progress_for_shard(
    progress: Callable[[ProgressEvent], None], shard: str
) -> Callable[[ProgressEvent], None]:
    """`progress` with every event attributed to `shard` (the load engine knows tables only)."""

    def forward(event: ProgressEvent) -> None:
        progress(event if event.shard else dataclasses.replace(event, shard=shard))

    return forward
