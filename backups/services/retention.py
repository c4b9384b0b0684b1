"""Retention: which sets of a cluster are kept and why, and the removal of the rest.

DESIGN.md, "Policies, schedules and retention". The unit is the **chain**: a full set and
every set whose parent links lead back to it. A chain is kept whole or removed whole.

A chain is kept (with every reason that applies) when:

* it is the **newest succeeded chain** (the newest succeeded full set's);
* a set of it is **on hold** (`backups hold`), or is **named by a restore request** that is
  pending, approved or running (a point-in-time request names the full set its chain starts
  from), or is still **pending or running**;
* a set of it is younger than **keep_days** (nothing younger is ever removed);
* its full set is one of the **keep_full** newest succeeded full sets;
* GFS: its full set is the newest succeeded full of one of the last **keep_daily** UTC days,
  **keep_weekly** ISO weeks or **keep_monthly** months, counted as calendar periods back from
  the current one (today, this ISO week, this month count as the first), so a period without
  a full keeps nothing and a gap in backups is never papered over by an older set.

Otherwise the chain's succeeded sets are removed. Failed and cancelled sets never count as a
kept chain and never keep one: their objects were deleted when they ended, and their rows are
expired once older than keep_days (sooner never: they are evidence of what went wrong), unless
held, named by a request, or a live set depends on one.

Removal of a chain: one transaction locks its rows (primary-key order), re-checks the rules
that may have changed (hold, request, a new dependent) and marks every set `expiring_since`;
then, children first, each set's objects are deleted from every storage target
(`storage_targets.set_all_targets`: the default target and every copy; on S3 in batched DeleteObjects) and the set is marked `expired`, row kept,
with one audit event. A removal interrupted half-way leaves sets `expiring_since` but not
expired: the next run finishes them first and only then reports them removed. A set being
removed can be neither held nor restored (hold and restore requests refuse it).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from django.db import transaction
from django.utils import timezone

from backups.models import BackupPolicy, BackupSet, RestoreRequest
from backups.services.sets import lock_set, set_prefix
from backups.services.storage_targets import set_all_targets
from backups.services.webhooks import webhook_retention_removed
from backups.status import RequestState, SetStatus
from console.audit import audit_record
from shards.models import Cluster

log = logging.getLogger(__name__)

RETENTION_ACTOR = "retention"
_DEAD = (SetStatus.FAILED, SetStatus.CANCELLED)

# The columns a decision reads; loading only these keeps a plan over thousands of sets cheap.
_PLAN_FIELDS = (
    "id",
    "cluster_id",
    "kind",
    "parent_id",
    "status",
    "created_at",
    "held_at",
    "hold_reason",
    "held_by__username",
    "expiring_since",
)


@dataclass(frozen=True)
class Decision:
    """What retention does with one set, and why (one sentence for a person)."""

    set_id: int
    remove: bool
    reason: str
    # Kept only by time-based rules (keep_days, GFS): the day the last of them lapses; the
    # first retention run on or after it removes the set unless something newer keeps it.
    expires_on: date | None = None

    def as_json(self) -> dict:
        return {"set": self.set_id, "reason": self.reason}

    @property
    def note(self) -> str:
        """The sets page's line: "kept because ..." or "expires on ..."."""
        if self.remove:
            return f"expires at the next retention run: {self.reason}"
        if self.expires_on is not None:
            return f"expires on {self.expires_on.isoformat()} (kept because {self.reason})"
        return f"kept because {self.reason}"


@dataclass
class RetentionPlan:
    cluster: Cluster
    now: datetime
    decisions: list[Decision]  # newest set first

    @property
    def removed(self) -> list[Decision]:
        return [d for d in self.decisions if d.remove]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if not d.remove]


@dataclass
class RetentionResult:
    """What `retention_apply` did (or, in a dry run, would do)."""

    cluster: str
    dry_run: bool
    removed: list[Decision] = field(default_factory=list)
    kept: list[Decision] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # [{"set", "error"}]: not removed yet
    objects_deleted: int = 0
    bytes_freed: int = 0

    def as_json(self) -> dict:
        return {
            "cluster": self.cluster,
            "dry_run": self.dry_run,
            "removed": [d.as_json() for d in self.removed],
            "kept": [d.as_json() for d in self.kept],
            "errors": self.errors,
            "objects_deleted": self.objects_deleted,
            "bytes_freed": self.bytes_freed,
        }


# ------------------------------------------------------------------------------ decide


@dataclass(frozen=True)
class _Rules:
    keep_full: int
    keep_daily: int
    keep_weekly: int
    keep_monthly: int
    keep_days: int

    @classmethod
    def of(cls, policy: BackupPolicy | None) -> _Rules:
        policy = policy or BackupPolicy()  # an unsaved policy carries the defaults
        return cls(
            keep_full=policy.keep_full,
            keep_daily=policy.keep_daily,
            keep_weekly=policy.keep_weekly,
            keep_monthly=policy.keep_monthly,
            keep_days=policy.keep_days,
        )

    @property
    def summary(self) -> str:
        return (
            f"keep_full {self.keep_full}, keep_daily {self.keep_daily}, keep_weekly "
            f"{self.keep_weekly}, keep_monthly {self.keep_monthly}"
        )


def _day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def _monday(day: date) -> date:
    return day - timedelta(days=day.weekday())


def _month_index(day: date) -> int:
    return day.year * 12 + day.month - 1


def _month_start(index: int) -> date:
    return date(index // 12, index % 12 + 1, 1)


def _gfs_reasons(
    fulls: list[BackupSet], rules: _Rules, today: date
) -> dict[int, list[tuple[str, date | None]]]:
    """full set id -> [(reason, lapse day)] for keep_full and the GFS periods.

    `fulls` are the succeeded full sets, newest first.
    """
    reasons: dict[int, list[tuple[str, date | None]]] = defaultdict(list)
    for full in fulls[: rules.keep_full]:
        reasons[full.pk].append(
            (f"among the {rules.keep_full} newest fulls (keep_full {rules.keep_full})", None)
        )
    seen_days: set[date] = set()
    seen_weeks: set[date] = set()
    seen_months: set[int] = set()
    this_monday, this_month = _monday(today), _month_index(today)
    for full in fulls:  # newest first: the first full met in a period is its newest
        day = _day(full.created_at)
        if rules.keep_daily and day not in seen_days:
            seen_days.add(day)
            if day > today - timedelta(days=rules.keep_daily):
                reasons[full.pk].append(
                    (
                        f"newest full of {day.isoformat()} (keep_daily {rules.keep_daily})",
                        day + timedelta(days=rules.keep_daily),
                    )
                )
        monday = _monday(day)
        if rules.keep_weekly and monday not in seen_weeks:
            seen_weeks.add(monday)
            if monday > this_monday - timedelta(weeks=rules.keep_weekly):
                year, week, _ = day.isocalendar()
                reasons[full.pk].append(
                    (
                        f"newest full of week {year}-W{week:02d} (keep_weekly {rules.keep_weekly})",
                        monday + timedelta(weeks=rules.keep_weekly),
                    )
                )
        month = _month_index(day)
        if rules.keep_monthly and month not in seen_months:
            seen_months.add(month)
            if month > this_month - rules.keep_monthly:
                reasons[full.pk].append(
                    (
                        f"newest full of {day:%Y-%m} (keep_monthly {rules.keep_monthly})",
                        _month_start(month + rules.keep_monthly),
                    )
                )
    return reasons


def _hold_text(backup_set: BackupSet) -> str:
    by = getattr(getattr(backup_set, "held_by", None), "username", "") or "someone"
    reason = f": {backup_set.hold_reason}" if backup_set.hold_reason else ""
    return f"set {backup_set.pk} is on hold (by {by}){reason}"


def retention_decide(
    *,
    sets: Iterable[BackupSet],
    policy: BackupPolicy | None,
    requested: dict[int, str],
    now: datetime,
) -> list[Decision]:
    """The decision for every set of one cluster that is not expired yet, newest first.

    `sets` are all the cluster's sets (expired ones too: they still root chains);
    `requested` maps set id -> the restore request that names it ("restore request 4
    (approved)"). Pure: reads only the given objects.
    """
    rules = _Rules.of(policy)
    all_sets = {s.pk: s for s in sets}
    floor = now - timedelta(days=rules.keep_days)
    today = _day(now)

    roots: dict[int, int] = {}

    def root_of(backup_set: BackupSet) -> int:
        path = []
        current = backup_set
        while current.pk not in roots:
            path.append(current.pk)
            parent = all_sets.get(current.parent_id) if current.parent_id else None
            if parent is None or parent.pk in path:
                roots[current.pk] = current.pk
                break
            current = parent
        root = roots[current.pk]
        for pk in path:
            roots[pk] = root
        return root

    children: dict[int, list[BackupSet]] = defaultdict(list)
    chains: dict[int, list[BackupSet]] = defaultdict(list)
    for backup_set in all_sets.values():
        if backup_set.parent_id:
            children[backup_set.parent_id].append(backup_set)
        chains[root_of(backup_set)].append(backup_set)

    def live(backup_set: BackupSet) -> bool:
        return (
            backup_set.status not in _DEAD
            and backup_set.status != SetStatus.EXPIRED
            and backup_set.expiring_since is None
        )

    def live_dependent(backup_set: BackupSet) -> BackupSet | None:
        stack = list(children.get(backup_set.pk, ()))
        while stack:
            child = stack.pop()
            if live(child):
                return child
            stack.extend(children.get(child.pk, ()))
        return None

    fulls = sorted(
        (
            s
            for s in all_sets.values()
            if s.kind == BackupSet.Kind.FULL and s.status == SetStatus.SUCCEEDED and live(s)
        ),
        key=lambda s: (s.created_at, s.pk),
        reverse=True,
    )
    newest_root = fulls[0].pk if fulls else None
    gfs = _gfs_reasons(fulls, rules, today)
    keep_days_text = f"younger than keep_days ({rules.keep_days} days)"

    decisions: dict[int, Decision] = {}
    for root_id, members in chains.items():
        # Interrupted removals are finished whatever the rules say now: objects are gone.
        for s in members:
            if s.expiring_since is not None and s.status != SetStatus.EXPIRED:
                decisions[s.pk] = Decision(
                    s.pk,
                    True,
                    f"finishing a removal begun at {s.expiring_since:%Y-%m-%d %H:%M:%S} UTC "
                    "(it was interrupted)",
                )
        # Failed and cancelled sets: on their own, never as part of a kept chain.
        for s in members:
            if s.status not in _DEAD or s.expiring_since is not None:
                continue
            dependent = live_dependent(s)
            if s.held_at is not None:
                decisions[s.pk] = Decision(s.pk, False, _hold_text(s))
            elif s.pk in requested:
                decisions[s.pk] = Decision(s.pk, False, f"named by {requested[s.pk]}")
            elif dependent is not None:
                decisions[s.pk] = Decision(
                    s.pk, False, f"set {dependent.pk} depends on it (its chain is kept)"
                )
            elif s.created_at > floor:
                decisions[s.pk] = Decision(
                    s.pk,
                    False,
                    f"a {s.status} set {keep_days_text}; removed after that, it never "
                    "counts as a kept chain",
                    expires_on=_day(s.created_at + timedelta(days=rules.keep_days)),
                )
            else:
                decisions[s.pk] = Decision(
                    s.pk,
                    True,
                    f"a {s.status} set older than keep_days ({rules.keep_days} days); "
                    "failed and cancelled sets never count as a kept chain",
                )
        chain = sorted((s for s in members if live(s)), key=lambda s: s.pk)
        if not chain:
            continue
        reasons: list[tuple[str, date | None]] = []
        if root_id == newest_root:
            reasons.append(("newest succeeded chain", None))
        # A hold keeps its set's whole chain, also when the held set itself failed.
        for s in sorted(members, key=lambda s: s.pk):
            if s.held_at is not None and s.status != SetStatus.EXPIRED:
                reasons.append((_hold_text(s), None))
        for s in chain:
            if s.pk in requested:
                reasons.append((f"set {s.pk} is named by {requested[s.pk]}", None))
        for s in chain:
            if s.status in SetStatus.ACTIVE:
                reasons.append((f"set {s.pk} is {s.status}", None))
        youngest = max(s.created_at for s in chain)
        if youngest > floor:
            reasons.append((keep_days_text, _day(youngest + timedelta(days=rules.keep_days))))
        reasons.extend(gfs.get(root_id, ()))
        if reasons:
            text = "; ".join(r for r, _ in reasons)
            lapses = [lapse for _, lapse in reasons]
            expires_on = max(lapses) if all(lapses) else None  # type: ignore[type-var]
        else:
            text = f"older than keep_days ({rules.keep_days} days) and not kept by {rules.summary}"
            expires_on = None
        for s in chain:
            own = text if s.pk == root_id else f"in the chain of set {root_id}: {text}"
            decisions[s.pk] = Decision(s.pk, not reasons, own, expires_on=expires_on)
    return [decisions[pk] for pk in sorted(decisions, reverse=True)]


def _requested_sets(cluster_ids: Iterable[int]) -> dict[int, dict[int, str]]:
    """cluster id -> {set id: "restore request N (state)"} for pending/approved/running ones."""
    named: dict[int, dict[int, str]] = defaultdict(dict)
    requests = RestoreRequest.objects.filter(
        cluster_id__in=list(cluster_ids),
        state__in=RequestState.ACTIVE,
        source_set__isnull=False,
    ).values_list("pk", "cluster_id", "source_set_id", "state")
    for pk, cluster_id, set_id, state in requests:
        named[cluster_id].setdefault(set_id, f"restore request {pk} ({state})")
    return named


def _plan_sets(cluster_ids: Iterable[int]):
    return (
        BackupSet.objects.filter(cluster_id__in=list(cluster_ids))
        .select_related("held_by")
        .only(*_PLAN_FIELDS)
        .order_by()
    )


def retention_plan(*, cluster: Cluster, now: datetime | None = None) -> RetentionPlan:
    """The decision for every not-yet-expired set of `cluster` (three queries)."""
    now = now or timezone.now()
    policy = BackupPolicy.objects.filter(cluster=cluster).first()
    decisions = retention_decide(
        sets=_plan_sets([cluster.pk]),
        policy=policy,
        requested=_requested_sets([cluster.pk]).get(cluster.pk, {}),
        now=now,
    )
    return RetentionPlan(cluster=cluster, now=now, decisions=decisions)


def retention_notes(*, sets: Iterable[BackupSet], now: datetime | None = None) -> dict:
    """set id -> Decision for `sets` (a page's list), in three queries whatever their count."""
    now = now or timezone.now()
    cluster_ids = {s.cluster_id for s in sets}
    if not cluster_ids:
        return {}
    policies = {p.cluster_id: p for p in BackupPolicy.objects.filter(cluster_id__in=cluster_ids)}
    requested = _requested_sets(cluster_ids)
    by_cluster: dict[int, list[BackupSet]] = defaultdict(list)
    for backup_set in _plan_sets(cluster_ids):
        by_cluster[backup_set.cluster_id].append(backup_set)
    notes = {}
    for cluster_id, members in by_cluster.items():
        for decision in retention_decide(
            sets=members,
            policy=policies.get(cluster_id),
            requested=requested.get(cluster_id, {}),
            now=now,
        ):
            notes[decision.set_id] = decision
    return notes


# ------------------------------------------------------------------------------ remove


class _Changed(Exception):
    """A rule changed between the plan and the removal (a hold, a request, a new set)."""


def _removal_groups(plan_sets: dict[int, BackupSet], removals: list[Decision]) -> list[list[int]]:
    """Removals grouped so a chain is begun in one transaction: {root: [set ids]}."""
    removing = {d.set_id for d in removals}
    groups: dict[int, list[int]] = defaultdict(list)
    for pk in removing:
        root = pk
        while plan_sets[root].parent_id in removing:
            root = plan_sets[root].parent_id
        groups[root].append(pk)
    return [sorted(ids) for _, ids in sorted(groups.items())]


def _removal_begin(set_ids: list[int], now: datetime) -> None:
    """Lock the sets (pk order), re-check them, and mark them `expiring_since`.

    Raises _Changed when one was put on hold, named by a restore request, started, or got
    a new live dependent since the plan; nothing is marked then.
    """
    with transaction.atomic():
        locked = [lock_set(pk) for pk in sorted(set_ids)]
        for backup_set in locked:
            if backup_set.expiring_since is not None or backup_set.status == SetStatus.EXPIRED:
                continue
            if backup_set.held_at is not None:
                raise _Changed(f"set {backup_set.pk} was put on hold")
            if backup_set.status in SetStatus.ACTIVE:
                raise _Changed(f"set {backup_set.pk} is {backup_set.status}")
        named = (
            RestoreRequest.objects.filter(source_set_id__in=set_ids, state__in=RequestState.ACTIVE)
            .order_by("pk")
            .first()
        )
        if named is not None:
            raise _Changed(f"restore request {named.pk} names set {named.source_set_id}")
        dependent = (
            BackupSet.objects.filter(parent_id__in=set_ids)
            .exclude(pk__in=set_ids)
            .exclude(status__in=[*_DEAD, SetStatus.EXPIRED])
            .order_by("pk")
            .first()
        )
        if dependent is not None:
            raise _Changed(f"set {dependent.pk} now depends on set {dependent.parent_id}")
        fresh = [s.pk for s in locked if s.expiring_since is None and s.status != SetStatus.EXPIRED]
        BackupSet.objects.filter(pk__in=fresh).update(expiring_since=now)


def _objects_remove(backup_set: BackupSet) -> tuple[int, int, list[str]]:
    """Delete the set's objects from every target: (objects, bytes, target names)."""
    objects = size = 0
    names = []
    prefix = set_prefix(backup_set) + "/"  # the slash keeps set 1 from taking sets 10, 100...
    for name, storage in set_all_targets(backup_set):
        size += sum(info.size for info in storage.list(prefix))
        objects += storage.delete_prefix(prefix)
        names.append(name)
    return objects, size, names


def _removal_finish(
    set_id: int, *, reason: str, actor, objects: int, size: int, targets: list[str]
) -> bool:
    """Mark a set whose objects are gone `expired` with its audit event (False if it already
    was: a concurrent run finished it)."""
    with transaction.atomic():
        locked = lock_set(set_id)
        if locked.status == SetStatus.EXPIRED:
            return False
        previous = locked.status
        locked.status = SetStatus.EXPIRED
        locked.expiring_since = locked.expiring_since or timezone.now()
        locked.save(update_fields=["status", "expiring_since"])
        audit_record(
            actor=actor,
            action="backup.expired",
            obj=locked,
            details={
                "reason": reason,
                "previous_status": previous,
                "kind": locked.kind,
                "objects_deleted": objects,
                "bytes_freed": size,
                "targets": targets,
            },
        )
    return True


def retention_apply(
    *,
    cluster: Cluster,
    dry_run: bool = False,
    actor=RETENTION_ACTOR,
    now: datetime | None = None,
) -> RetentionResult:
    """Apply the cluster's retention: remove every set the plan removes, chain by chain.

    With `dry_run`, only the decisions (nothing is changed). A set whose objects could not
    all be deleted stays `expiring_since` (reported in `errors`, never in `removed`) and is
    finished by the next run; a chain that changed since the plan is kept and says why.
    """
    plan = retention_plan(cluster=cluster, now=now)
    result = RetentionResult(cluster=cluster.name, dry_run=dry_run, kept=plan.kept)
    if dry_run:
        result.removed = plan.removed
        return result
    removals = plan.removed
    if not removals:
        return result
    by_id = {d.set_id: d for d in removals}
    plan_sets = {
        s.pk: s
        for s in BackupSet.objects.filter(cluster=cluster, pk__in=list(by_id)).select_related(
            "cluster"
        )
    }
    for group in _removal_groups(plan_sets, removals):
        try:
            _removal_begin(group, plan.now)
        except _Changed as exc:
            for pk in group:
                result.kept.append(Decision(pk, False, f"changed while retention ran: {exc}"))
            continue
        failed_at = None
        for pk in sorted(group, reverse=True):  # children before the sets they depend on
            if failed_at is not None:  # the sets it depends on stay until it is gone
                result.errors.append(
                    {"set": pk, "error": f"waits for set {failed_at}; the next run finishes it"}
                )
                continue
            try:
                objects, size, targets = _objects_remove(plan_sets[pk])
            except Exception as exc:  # noqa: BLE001 - the set stays expiring; next run retries
                log.exception("retention could not delete the objects of set %s", pk)
                result.errors.append({"set": pk, "error": f"objects not deleted: {exc}"})
                failed_at = pk
                continue
            result.objects_deleted += objects
            result.bytes_freed += size
            if _removal_finish(
                pk,
                reason=by_id[pk].reason,
                actor=actor,
                objects=objects,
                size=size,
                targets=targets,
            ):
                result.removed.append(by_id[pk])
    result.removed.sort(key=lambda d: d.set_id, reverse=True)
    result.kept.sort(key=lambda d: d.set_id, reverse=True)
    if result.removed:
        webhook_retention_removed(cluster, [d.as_json() for d in result.removed])
    return result


def retention_apply_all() -> dict:
    """Housekeeping's daily run: apply every cluster's retention, each cluster on its own (one
    that fails is logged and reported; the others still run)."""
    done: dict[str, dict] = {}
    for cluster in Cluster.objects.order_by("name"):
        try:
            result = retention_apply(cluster=cluster)
        except Exception as exc:  # noqa: BLE001 - logged; the next run tries again
            log.exception("retention of cluster %s failed", cluster.name)
            done[cluster.name] = {"error": str(exc)}
            continue
        done[cluster.name] = {
            "removed": [d.set_id for d in result.removed],
            "errors": result.errors,
            "bytes_freed": result.bytes_freed,
        }
    return done
