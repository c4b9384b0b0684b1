"""The one JobTracker, against the console's real database: progress, heartbeat, cancel."""

from __future__ import annotations

import threading
import time

import pytest

from backups.engine.types import ProgressEvent
from backups.models import BackupSet, VerificationRun
from backups.services.progress import JobTracker
from shards.models import Cluster


def _running_set() -> BackupSet:
    cluster = Cluster.objects.create(name=f"t{time.monotonic_ns() % 10**8}")
    return BackupSet.objects.create(
        cluster=cluster, storage_url="file:///nowhere", status=BackupSet.Status.RUNNING
    )


def _wait_for(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.django_db(transaction=True)
def test_progress_from_many_threads_reaches_the_row_and_a_cancel_reaches_the_job():
    backup_set = _running_set()
    flushed = []
    tracker = JobTracker(BackupSet, backup_set.pk, interval=0.2, on_flush=flushed.append)

    def engine_thread(shard: str) -> None:
        for _ in range(500):
            tracker.progress(ProgressEvent(shard=shard, table="t", rows_done=2, bytes_done=10))

    with tracker:
        threads = [threading.Thread(target=engine_thread, args=(s,)) for s in ("s00", "s01")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _wait_for(lambda: BackupSet.objects.get(pk=backup_set.pk).rows_done == 2000)
        assert _wait_for(lambda: flushed and flushed[-1].shards.get("s01") == [1000, 5000])
        row = BackupSet.objects.get(pk=backup_set.pk)
        assert row.bytes_done == 10_000
        assert row.heartbeat_at is not None
        assert not tracker.should_cancel()

        # Only what moved since the last write is handed on: a finished shard is left alone.
        tracker.progress(ProgressEvent(shard="s01", table="t", rows_done=1))
        assert _wait_for(lambda: flushed[-1].changed_shards == {"s01"})
        assert flushed[-1].changed_tables == {("s01", "t")}
        assert flushed[-1].shards["s00"] == [1000, 5000]  # totals stay whole

        BackupSet.objects.filter(pk=backup_set.pk).update(cancel_requested=True)
        assert _wait_for(tracker.should_cancel, seconds=3)
    # Per-shard totals went to the hook, for the pages' per-shard rows.
    assert flushed[-1].shards == {"s00": [1000, 5000], "s01": [1001, 5000]}
    assert flushed[-1].tables[("s00", "t")][:2] == [1000, 5000]


@pytest.mark.django_db(transaction=True)
def test_writes_are_throttled_whatever_the_engine_sends():
    backup_set = _running_set()
    writes = []
    tracker = JobTracker(BackupSet, backup_set.pk, interval=0.5, on_flush=writes.append)
    with tracker:
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:
            tracker.progress(ProgressEvent(rows_done=1))
    # About three writes in 1.6 s at one per 0.5 s (plus the last one on stop), not thousands.
    assert 2 <= len(writes) <= 5
    assert BackupSet.objects.get(pk=backup_set.pk).rows_done == tracker.rows_done


@pytest.mark.django_db(transaction=True)
def test_a_model_without_progress_columns_gets_only_what_it_has():
    backup_set = _running_set()
    run = VerificationRun.objects.create(backup_set=backup_set, status="running")
    tracker = JobTracker(VerificationRun, run.pk, interval=0.2)
    with tracker:
        tracker.say("12 objects checked")
        assert not tracker.should_cancel()  # VerificationRun has no cancel flag
    run.refresh_from_db()
    assert run.progress_text == "12 objects checked"
    assert run.heartbeat_at is not None


@pytest.mark.django_db
def test_rows_a_failed_write_missed_are_written_by_the_next_flush():
    backup_set = _running_set()
    seen = []

    def hook(snapshot):
        seen.append(set(snapshot.changed_shards))
        if len(seen) == 1:
            raise RuntimeError("the console database went away for a moment")

    tracker = JobTracker(BackupSet, backup_set.pk, on_flush=hook)
    tracker.progress(ProgressEvent(shard="s00", table="t", rows_done=5))
    with pytest.raises(RuntimeError):
        tracker.flush()
    tracker.flush()  # nothing new arrived, but s00's row was never written
    assert seen == [{"s00"}, {"s00"}]
