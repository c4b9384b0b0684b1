"""Read-side of policies: the JSON of `policy show`, and when the schedules fire next.

Tick times (UTC):
* full backups: every time `full_cron` matches (croniter);
* incrementals: every multiple of `incremental_every_minutes` since the Unix epoch, so any
  number of schedulers compute the same ticks, and the first one comes at most N minutes
  after the policy asks for them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import islice

from croniter import croniter
from django.utils import timezone

from backups.models import BackupPolicy
from shards.models import Cluster

FULL = "full"
INCREMENTAL = "incremental"


def policy_for(cluster: Cluster) -> BackupPolicy:
    """The cluster's policy, or an unsaved one with the defaults when it has none yet."""
    return BackupPolicy.objects.filter(cluster=cluster).first() or BackupPolicy(cluster=cluster)


def policy_json(policy: BackupPolicy) -> dict:
    """The object of `policy show|set --json` (DESIGN.md; keys never removed)."""
    return {
        "cluster": policy.cluster.name,
        "full_cron": policy.full_cron,
        "full_consistency": policy.full_consistency,
        "incremental_every_minutes": policy.incremental_every_minutes,
        "keep_full": policy.keep_full,
        "keep_daily": policy.keep_daily,
        "keep_weekly": policy.keep_weekly,
        "keep_monthly": policy.keep_monthly,
        "keep_days": policy.keep_days,
        "copy_to": list(policy.copy_to or []),
        "full_method": policy.full_method,
        "exclude_tables": list(policy.exclude_tables or []),
        "max_threads_running": policy.max_threads_running,
        "encrypt": policy.encrypt,
        "compression_level": policy.compression_level,
        "rpo_target_minutes": policy.rpo_target_minutes,
        "drill_every_days": policy.drill_every_days,
        "webhook_url": policy.webhook_url,
    }


def _utc(moment: datetime | None) -> datetime:
    return (moment or timezone.now()).astimezone(UTC)


def full_ticks(expression: str, *, after: datetime | None = None):
    """Times (UTC, ascending, strictly after `after`) at which `expression` fires."""
    if not expression:
        return
    it = croniter(expression, _utc(after))
    while True:
        yield it.get_next(datetime)


def full_tick_matches(expression: str, moment: datetime) -> bool:
    """Whether `moment` is a tick of `expression` (the policy may have changed since)."""
    if not expression:
        return False
    return croniter.match(expression, _utc(moment))


def incremental_ticks(minutes: int, *, after: datetime | None = None):
    """Multiples of `minutes` since the epoch, strictly after `after`."""
    if minutes <= 0:
        return
    step = minutes * 60
    seconds = int(_utc(after).timestamp()) // step * step + step
    while True:
        yield datetime.fromtimestamp(seconds, tz=UTC)
        seconds += step


def incremental_tick_matches(minutes: int, moment: datetime) -> bool:
    return minutes > 0 and moment.second == 0 and int(moment.timestamp()) % (minutes * 60) == 0


def next_runs(
    policy: BackupPolicy, n: int = 5, now: datetime | None = None, kind: str = ""
) -> list[dict]:
    """The next `n` scheduled runs, soonest first: [{"at": datetime UTC, "kind"}].

    `kind` "full" or "incremental" keeps only that kind.
    """
    runs: list[dict] = []
    if kind in ("", FULL) and policy.full_cron:
        runs += [
            {"at": at, "kind": FULL} for at in islice(full_ticks(policy.full_cron, after=now), n)
        ]
    if kind in ("", INCREMENTAL) and policy.incremental_every_minutes > 0:
        runs += [
            {"at": at, "kind": INCREMENTAL}
            for at in islice(incremental_ticks(policy.incremental_every_minutes, after=now), n)
        ]
    # A full and an incremental due at the same minute: the full runs (it starts a chain).
    merged: dict[datetime, dict] = {}
    for run in sorted(runs, key=lambda r: (r["at"], r["kind"] != FULL)):
        merged.setdefault(run["at"], run)
    return sorted(merged.values(), key=lambda r: r["at"])[:n]


def next_run(policy: BackupPolicy | None, now: datetime | None = None) -> dict | None:
    """The soonest scheduled run of a policy, or None when nothing is scheduled."""
    if policy is None:
        return None
    runs = next_runs(policy, 1, now=now)
    return runs[0] if runs else None
