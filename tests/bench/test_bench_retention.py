"""Retention over 1,000 sets: how long a plan (dry run) and a real apply take.

Not part of `make test` (tests/bench is outside testpaths). Run on its own:

    .venv/bin/python -m pytest tests/bench/test_bench_retention.py -s -q -p no:xdist

The history is made directly as set rows with a few small objects each in a LocalStorage (a
real backup per set would measure the backups, not retention): `SHARDVAULT_BENCH_RETENTION_SETS`
sets (default 1000), one full a day with three incrementals after it, oldest first, under the
default policy (keep_full 7, keep_daily 7, keep_weekly 4, keep_monthly 6, keep_days 7). The
test asserts what retention did (the kept chains whole, every removed set's objects gone), and
prints the timings; it never asserts a time.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from backups.models import BackupPolicy, BackupSet
from backups.services.retention import retention_apply
from backups.services.sets import default_storage
from shards.models import Cluster

pytestmark = pytest.mark.django_db(transaction=True)

SETS = int(os.environ.get("SHARDVAULT_BENCH_RETENTION_SETS", "1000"))
PER_CHAIN = 4  # a full and three incrementals
OBJECTS_PER_SET = 3
OBJECT_BYTES = 2048


def _history(cluster: Cluster) -> int:
    """SETS set rows (chains of PER_CHAIN, one chain a day) and their objects; stored bytes."""
    store = default_storage()
    now = timezone.now()
    chains = SETS // PER_CHAIN
    payload = os.urandom(OBJECT_BYTES)
    stored = 0
    for chain in range(chains):
        day = now - timedelta(days=chains - chain, hours=1)
        parent = None
        for link in range(PER_CHAIN):
            backup_set = BackupSet.objects.create(
                cluster=cluster,
                kind="full" if link == 0 else "incremental",
                parent=parent,
                status="succeeded",
                storage_url=store.url,
            )
            backup_set.object_prefix = f"{cluster.name}/{backup_set.pk}"
            backup_set.save(update_fields=["object_prefix"])
            BackupSet.objects.filter(pk=backup_set.pk).update(
                created_at=day + timedelta(minutes=10 * link)
            )
            store.put_bytes(f"{backup_set.object_prefix}/manifest.json", payload[:200])
            for n in range(OBJECTS_PER_SET - 1):
                store.put_bytes(
                    f"{backup_set.object_prefix}/s00/db/t/chunk-{n + 1:06d}.tsv.zst", payload
                )
            stored += 200 + (OBJECTS_PER_SET - 1) * OBJECT_BYTES
            parent = backup_set
    return stored


def test_bench_retention_over_a_thousand_sets(settings, tmp_path):
    settings.STORAGE_URL = f"file://{tmp_path / 'store'}"
    cluster = Cluster.objects.create(name="bench-retention")
    BackupPolicy.objects.create(cluster=cluster)  # the defaults of DESIGN.md
    started = time.perf_counter()
    stored = _history(cluster)
    built = time.perf_counter() - started
    total = BackupSet.objects.filter(cluster=cluster).count()

    started = time.perf_counter()
    dry = retention_apply(cluster=cluster, dry_run=True)
    plan_seconds = time.perf_counter() - started
    assert len(dry.removed) + len(dry.kept) == total

    started = time.perf_counter()
    result = retention_apply(cluster=cluster)
    apply_seconds = time.perf_counter() - started

    assert result.errors == []
    assert {d.set_id for d in result.removed} == {d.set_id for d in dry.removed}
    left = BackupSet.objects.filter(cluster=cluster).exclude(status="expired")
    kept_fulls = left.filter(kind="full").count()
    assert left.count() == kept_fulls * PER_CHAIN  # chains kept whole
    store = default_storage()
    remaining = sum(info.size for info in store.list(f"{cluster.name}/"))
    assert result.bytes_freed == stored - remaining
    print(  # noqa: T201
        f"\nretention over {total} sets ({connection.vendor}): history built in {built:.1f} s; "
        f"plan (dry run) {plan_seconds:.2f} s; apply {apply_seconds:.1f} s "
        f"({apply_seconds / max(1, len(result.removed)) * 1000:.1f} ms per removed set); "
        f"removed {len(result.removed)}, kept {left.count()} ({kept_fulls} chains); "
        f"objects deleted {result.objects_deleted}, freed {result.bytes_freed} of {stored} bytes"
    )
