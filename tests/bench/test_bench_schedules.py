"""Schedule jitter: how late a scheduled backup is recorded after its tick, with real workers.

An every-minute `full_cron` runs on two `rqworker --with-scheduler` processes against real
MariaDB and Redis for `SHARDVAULT_BENCH_TICKS` ticks (default 3). Jitter is the set's
`created_at` minus the tick time (the minute the cron named). Results go to stdout and
`var/bench/schedule-jitter.json`.

    .venv/bin/python -m pytest tests/bench/test_bench_schedules.py -s -q -p no:xdist
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest

from backups.models import BackupSet, ScheduleTick
from backups.services.policies import policy_update
from tests.factories import make_cluster, make_user

pytestmark = pytest.mark.django_db(transaction=True)

RESULTS = Path(__file__).resolve().parents[2] / "var" / "bench" / "schedule-jitter.json"


def test_schedule_jitter_over_real_ticks(mariadb_servers, unique_name, rq_worker_process):
    ticks = int(os.environ.get("SHARDVAULT_BENCH_TICKS", "3"))
    cluster = make_cluster(mariadb_servers, name=f"jit{unique_name}", tables={"t_order": 2000})
    rq_worker_process(scheduler=True)
    rq_worker_process(scheduler=True)
    policy_update(cluster=cluster, actor=make_user("admin"), changes={"full_cron": "* * * * *"})

    def started():
        return list(
            ScheduleTick.objects.filter(cluster=cluster, outcome="started")
            .select_related("backup_set")
            .order_by("tick_at")
        )

    deadline = time.monotonic() + 90 * (ticks + 1)
    while time.monotonic() < deadline:
        done = [
            t for t in started() if t.backup_set and t.backup_set.status in ("succeeded", "failed")
        ]
        if len(done) >= ticks:
            break
        time.sleep(1)
    policy_update(cluster=cluster, actor=make_user("admin"), changes={"full_cron": ""})
    rows = started()[:ticks]
    assert len(rows) == ticks, f"only {len(rows)} ticks ran"
    jitter = [(t.backup_set.created_at - t.tick_at).total_seconds() for t in rows]
    skipped = ScheduleTick.objects.filter(cluster=cluster, outcome="skipped").count()
    assert all(t.backup_set.status == "succeeded" for t in rows)
    assert BackupSet.objects.filter(cluster=cluster).count() == len(started())
    report = {
        "ticks": ticks,
        "jitter_seconds": jitter,
        "mean": statistics.mean(jitter),
        "max": max(jitter),
        "skipped_ticks": skipped,
        "set_seconds": [t.backup_set.duration_seconds for t in rows],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
