"""Verification runs: storage checks and restore drills, and the quality score they give.

State changes here lock their rows, write an audit event in the same transaction and
defer side effects (enqueueing, alerts) to `transaction.on_commit` (STYLE.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connections, transaction
from django.utils import timezone

from backups import queue
from backups.engine import verify as engine
from backups.engine.binlog_apply import ApplyResult
from backups.engine.throttle import ThreadsRunningGate
from backups.engine.types import ProgressEvent
from backups.models import BackupPolicy, BackupSet, SetCopy, VerificationRun
from backups.selectors.verification import drills_due
from backups.services.alerts import alert_quality_dropped
from backups.services.connection_slots import (
    SlotsUnavailable,
    connection_slots_held,
    instance_needs,
    slots_at_cap_sentence,
    slots_short,
)
from backups.services.errors import VerificationError
from backups.services.parts import Part, PartContext, PartFailed, PartsCancelled, parts_run
from backups.services.physical_drill import NO_CHECKSUMS_NOTE, physical_drill
from backups.services.pitr import chain_apply
from backups.services.progress import JobTracker
from backups.services.sets import (
    lock_set,
    set_data_key,
    set_manifest_binding,
    set_prefix,
)
from backups.services.storage_targets import (
    DEFAULT_TARGET,
    served_record,
    served_records_merge,
    set_read_storage,
    storage_target_names,
)
from backups.status import SetStatus, VerificationStatus
from console.audit import audit_record
from console.keys import manifest_hmac_key
from console.roles import ADMIN, OPERATOR, require_role
from shards.models import Shard
from shards.selectors import instance_endpoint
from shards.services.identity import instance_identity_check

JOB = "backups.jobs.verification.verification_job"
# How long a drill waits for a connection slot on a server at its cap before failing.
DRILL_SLOT_WAIT_SECONDS = 10 * 60


def verification_job_id(verification: VerificationRun) -> str:
    return f"verify-{verification.pk}"


def _actor_label(user: Any) -> Any:
    return user if user is not None else "system"


def verification_start(
    *,
    backup_set: BackupSet,
    user: Any = None,
    drill: bool = False,
    enqueue: bool = True,
    target: str = "",
) -> VerificationRun:
    """File a verification of a succeeded set and queue it on `verify`.

    `user` must be an operator (or admin); `None` means the console itself (automatic
    verification after a backup, scheduled drills). Refuses sets that did not succeed and a
    second verification while one is pending or running. Without `target` it reads the
    set with fallback (default first, then complete copies); with one, it checks that
    target's copy alone (refused when the set has no copy there).
    """
    if user is not None and not isinstance(user, str):
        require_role(user, OPERATOR, ADMIN, action="start a verification")
    if target:
        _check_target(backup_set, target)
    with transaction.atomic():
        locked = lock_set(backup_set.pk)
        if locked.status != SetStatus.SUCCEEDED:
            raise VerificationError(
                f"set {locked.pk} is {locked.status}: only succeeded sets can be verified"
            )
        if drill and locked.kind == BackupSet.Kind.INCREMENTAL:
            _drill_chain(locked)  # refuses a broken chain now rather than in the worker
        if VerificationRun.objects.filter(
            backup_set=locked, drill=drill, target=target, status__in=VerificationStatus.ACTIVE
        ).exists():
            what = "drilled" if drill else "verified"
            where = f" on storage target {target}" if target else ""
            raise VerificationError(f"set {locked.pk} is already being {what}{where}")
        run = VerificationRun.objects.create(
            backup_set=locked,
            drill=drill,
            target=target,
            triggered_by=user if user is not None and not isinstance(user, str) else None,
        )
        run.job_id = verification_job_id(run)
        run.save(update_fields=["job_id"])
        audit_record(
            actor=_actor_label(user),
            action="verification.request",
            obj=run,
            details={"set": locked.pk, "drill": drill, "target": target},
        )
        if enqueue:
            job_id = run.job_id
            transaction.on_commit(
                lambda: queue.enqueue(JOB, run.pk, queue=queue.VERIFY, job_id=job_id)
            )
            # The reaper (a drill whose worker dies) and the hourly checks; best effort.
            transaction.on_commit(queue.periodic_ensure_scheduled)
    return run


def _check_target(backup_set: BackupSet, target: str) -> None:
    if target not in storage_target_names():
        raise VerificationError(f"there is no storage target named {target}")
    if target == DEFAULT_TARGET:
        return
    if not SetCopy.objects.filter(backup_set=backup_set, target=target).exists():
        raise VerificationError(f"set {backup_set.pk} has no copy on storage target {target}")


def verification_after_backup(backup_set: BackupSet) -> VerificationRun | None:
    """Called by the backup service when a set succeeds: queue its storage check per policy."""
    policy = BackupPolicy.objects.filter(cluster_id=backup_set.cluster_id).first()
    if policy is not None and not policy.verify_automatically:
        return None
    try:
        return verification_start(backup_set=backup_set, user=None, drill=False)
    except VerificationError:
        return None


def verification_backfill_automatic(*, window_hours: int = 48) -> list[VerificationRun]:
    """Queue the storage check of recent succeeded sets that were never verified, where the
    cluster's policy asks for it (a backstop for `verification_after_backup`)."""
    since = timezone.now() - timedelta(hours=window_hours)
    sets = (
        BackupSet.objects.filter(
            status=SetStatus.SUCCEEDED, created_at__gte=since, verifications__isnull=True
        )
        .exclude(cluster__policy__verify_automatically=False)
        .select_related("cluster")
        .order_by("id")
    )
    started = []
    for backup_set in sets:
        run = verification_after_backup(backup_set)
        if run is not None:
            started.append(run)
    return started


def verification_drills_schedule() -> list[VerificationRun]:
    """Queue a drill of the newest set of every cluster whose drill is due (housekeeping).

    A drill whose servers could not give it a connection slot now is skipped, like a busy
    schedule tick (audited `verification.skipped` with the instance at its cap): it is still
    due at the next housekeeping run."""
    started = []
    for backup_set in drills_due():
        short = _drill_slots_short(backup_set)
        if short:
            audit_record(
                actor="system",
                action="verification.skipped",
                obj=backup_set,
                details={"drill": True, "reason": short},
            )
            continue
        try:
            started.append(verification_start(backup_set=backup_set, user=None, drill=True))
        except VerificationError:
            continue
    return started


def _drill_chain(backup_set: BackupSet) -> tuple[BackupSet, list[BackupSet]]:
    """An incremental set's chain: (its full set, [its incrementals from the full set's child
    up to and including `backup_set`]), following parent links. VerificationError when a link
    is missing or did not succeed (the chain is broken, so the set cannot be restored)."""
    chain: list[BackupSet] = []
    seen: set[int] = set()
    current = backup_set
    while current.kind == BackupSet.Kind.INCREMENTAL:
        if current.status != SetStatus.SUCCEEDED:
            raise VerificationError(
                f"set {backup_set.pk} cannot be drilled: set {current.pk} of its chain is "
                f"{current.status}, so the chain is broken"
            )
        if current.consistent_at is None:
            raise VerificationError(
                f"set {backup_set.pk} cannot be drilled: set {current.pk} of its chain "
                "records no consistent point"
            )
        if current.parent_id is None or current.pk in seen:
            raise VerificationError(
                f"set {backup_set.pk} cannot be drilled: set {current.pk} of its chain has "
                "no usable parent, so the chain is broken"
            )
        seen.add(current.pk)
        chain.append(current)
        current = BackupSet.objects.select_related("cluster").get(pk=current.parent_id)
    if current.status != SetStatus.SUCCEEDED:
        raise VerificationError(
            f"set {backup_set.pk} cannot be drilled: its full set {current.pk} is "
            f"{current.status}, so the chain is broken"
        )
    chain.reverse()
    return current, chain


def _drill_target_instances(backup_set: BackupSet, doc: dict) -> tuple[dict, str, str]:
    """Shard name -> the Instance its scratch database goes to; the drill instance's name; a
    warning when there is none (the shards' own instances are used)."""
    cluster = backup_set.cluster
    names = [s.get("name", "") for s in engine.manifest_shards(doc)]
    if cluster.drill_instance_id:
        return {name: cluster.drill_instance for name in names}, cluster.drill_instance.name, ""
    shards = {
        s.name: s
        for s in Shard.objects.filter(cluster=cluster, name__in=names).select_related("instance")
    }
    missing = [n for n in names if n not in shards]
    if missing:
        raise VerificationError(
            f"cluster {cluster.name} has no drill instance and no longer has shard(s) "
            f"{', '.join(missing)}: set a drill instance"
        )
    warning = (
        f"warning: cluster {cluster.name} has no drill instance: scratch databases "
        f"{engine.DRILL_PREFIX}<verification id>_<db> were created (and dropped) on each shard's own (production) instance"
    )
    return {name: shards[name].instance for name in names}, "", warning


def _drill_targets(
    backup_set: BackupSet, instances: dict, drill_name: str, *, check_identity: bool = True
) -> dict:
    """Shard name -> endpoint. A drill instance is bound like a restore's target: the server
    recorded for its address, asked before any row is sent (refused when another answers;
    the owner asks once, its parts need not ask again)."""
    if drill_name and check_identity:
        instance_identity_check(instance=backup_set.cluster.drill_instance)
    endpoints: dict[int, Any] = {}
    for instance in instances.values():
        if instance.pk not in endpoints:
            endpoints[instance.pk] = instance_endpoint(instance)
    return {name: endpoints[instance.pk] for name, instance in instances.items()}


@contextmanager
def _drill_slots(run: VerificationRun, instances, *, poll: bool, tracker: JobTracker):
    """The drill's connection slots on every server it restores into; yields how many
    loads may run at once on each (the drill goes one shard and one table at a time, each
    table over up to DRILL_PARALLEL connections, beside the throttle's poll connection)."""
    extra = 1 if poll else 0
    needs, names = instance_needs(
        instances, minimum=1 + extra, wanted=engine.DRILL_PARALLEL + extra
    )
    try:
        with connection_slots_held(
            needs=needs,
            names=names,
            holder=drill_slot_holder(run.pk),
            wait=DRILL_SLOT_WAIT_SECONDS,
            tracker=tracker,
            queue_name=queue.VERIFY,
        ) as granted:
            if not granted:
                yield engine.DRILL_PARALLEL
            else:
                yield max(1, min(granted.values()) - extra)
    except SlotsUnavailable as exc:
        if tracker.should_cancel():
            raise VerificationError("the drill was cancelled while waiting for slots") from None
        raise VerificationError(f"the drill could not start: {exc}") from None


def _drill_slots_short(backup_set: BackupSet) -> str:
    """Why a drill of `backup_set` could not get its connection slots now ("" when it could,
    when it restores into no registered server (physical), or when Redis cannot say)."""
    full_set = backup_set
    if backup_set.kind == BackupSet.Kind.INCREMENTAL:
        try:
            full_set, _chain = _drill_chain(backup_set)
        except VerificationError:
            return ""  # verification_start says why
    if full_set.method == BackupSet.Method.PHYSICAL:
        return ""
    cluster = backup_set.cluster
    if cluster.drill_instance_id:
        instances = [cluster.drill_instance]
    else:
        instances = [s.instance for s in cluster.shards.select_related("instance")]
    poll = not cluster.drill_instance_id and _drill_throttled(backup_set)
    needs, names = instance_needs(instances, minimum=2 if poll else 1)
    try:
        redis = queue.redis_connection(queue.VERIFY)
        short = slots_short(redis, needs)
        return slots_at_cap_sentence(redis, needs, short, names, advice="") if short else ""
    except queue.QueueUnavailable:
        return ""


def drill_slot_holder(verification_id: int) -> str:
    return f"drill-{verification_id}"


def _drill_throttled(backup_set: BackupSet) -> bool:
    policy = BackupPolicy.objects.filter(cluster_id=backup_set.cluster_id).first()
    return bool(policy and policy.max_threads_running)


def _drill_throttles(backup_set: BackupSet, targets: dict) -> dict:
    """Shard name -> the max_threads_running gate of its target, for a drill that restores
    into the shards' own (production) instances; {} when the policy does not throttle."""
    policy = BackupPolicy.objects.filter(cluster_id=backup_set.cluster_id).first()
    if policy is None or not policy.max_threads_running:
        return {}
    by_address = {}
    for endpoint in targets.values():
        by_address.setdefault(
            endpoint.address,
            ThreadsRunningGate(
                instance=endpoint.name, endpoint=endpoint, limit=policy.max_threads_running
            ),
        )
    return {shard: by_address[endpoint.address] for shard, endpoint in targets.items()}


class _ObjectsChecked:
    """The engine's progress events as the run's line ("verify: N objects checked"), which
    the tracker writes (with the heartbeat) about once a second."""

    def __init__(self, tracker: JobTracker):
        self.tracker = tracker
        self.objects = 0

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == "throttle":  # a drill's pause line (max_threads_running)
            self.tracker.progress(event)
            return
        if event.stage == "verify":
            self.objects += 1
        self.tracker.say(
            event.message or f"{event.stage}: {self.objects} objects checked", flush=False
        )


def _storage_factors(check: engine.StorageCheck) -> tuple[float, float]:
    """Without a drill: T and D over the tables whose every object is whole."""
    doc = check.manifest
    if doc is None:
        return 0.0, 0.0
    broken = {p["object"] for p in check.problems if "object" in p}
    table_bad: dict[tuple, bool] = defaultdict(bool)
    for obj in engine.manifest_object_list(doc):
        ident = (obj.get("shard"), obj.get("database"), obj.get("table"))
        if obj.get("table"):
            table_bad[ident] |= obj["key"] in broken
    rows_total = rows_ok = tables_total = tables_ok = 0
    for shard in engine.manifest_shards(doc):
        for table in shard.get("tables") or []:
            rows = int(table.get("rows") or 0)
            ident = (shard.get("name"), shard.get("database"), table.get("name"))
            tables_total += 1
            rows_total += rows
            if not table_bad.get(ident, False):
                tables_ok += 1
                rows_ok += rows
    t = rows_ok / rows_total if rows_total else 1.0
    d = tables_ok / tables_total if tables_total else 1.0
    return t, d


def verification_execute(*, verification_id: int) -> VerificationRun:
    """Run a filed verification now, in this process (the job and the command call this).

    Idempotent: a run that is no longer pending is returned as it is. Results go to the
    run (t, d, a, q, problems, rto_seconds) and onto the set (q, verified_at).
    """
    with transaction.atomic():
        run = (
            VerificationRun.objects.select_for_update()
            .select_related("backup_set__cluster")
            .get(pk=verification_id)
        )
        if run.status != VerificationStatus.PENDING:
            return run
        run.status = VerificationStatus.RUNNING
        run.started_at = run.heartbeat_at = timezone.now()
        run.progress_text = (
            "drill: restoring into scratch databases" if run.drill else "checking storage"
        )
        run.save(update_fields=["status", "started_at", "heartbeat_at", "progress_text"])
        audit_record(
            actor="worker", action="verification.start", obj=run, details={"drill": run.drill}
        )

    backup_set = run.backup_set
    warnings: list[str] = []
    drill_name = ""
    details: dict = {}
    part_served: list[dict] = []
    try:
        # The tracker stops (its last write done) before the finish or fail transition.
        with JobTracker(VerificationRun, run.pk) as tracker:
            progress = _ObjectsChecked(tracker)
            full_set, chain = backup_set, []
            if run.drill and backup_set.kind == BackupSet.Kind.INCREMENTAL:
                full_set, chain = _drill_chain(backup_set)
                details["chain"] = [full_set.pk, *(s.pk for s in chain)]
                tracker.say(
                    f"drill: checking the chain of {len(chain) + 1} sets, then restoring full "
                    f"set {full_set.pk} and rolling forward to set {backup_set.pk}"
                )
            storages = {
                member.pk: set_read_storage(member, target=run.target)
                for member in [full_set, *chain]
            }
            check = _chain_storage_check([full_set, *chain], storages, progress=progress)
            problems = list(check.problems)
            a = check.a
            rto = None
            if (
                run.drill
                and check.manifest is not None
                and full_set.method == BackupSet.Method.PHYSICAL
            ):
                drilled = physical_drill(
                    doc=check.manifest,
                    storage=storages[full_set.pk],
                    data_key=set_data_key(full_set),
                    chain=chain,
                    until=backup_set.consistent_at if chain else None,
                    progress=tracker.say,
                )
                problems.extend(drilled.problems)
                t, d, rto = drilled.t, drilled.d, drilled.rto_seconds
                drill_name = "throwaway mariadbd"
                details["physical"] = {"tables": drilled.tables[:200], "rows": drilled.rows}
                warnings.append(NO_CHECKSUMS_NOTE)
            elif run.drill and check.manifest is not None:
                instances, drill_name, warning = _drill_target_instances(full_set, check.manifest)
                set_data_key(full_set)  # refused here, before any slot is taken or part starts
                with _drill_slots(
                    run,
                    instances.values(),
                    poll=not drill_name and _drill_throttled(backup_set),
                    tracker=tracker,
                ) as parallel:
                    targets = _drill_targets(full_set, instances, drill_name)
                    outcome, part_served, workers = _drill_in_parts(
                        run, check.manifest, targets, drill_name, progress, tracker, parallel
                    )
                details["workers"] = sorted(set(workers))
                problems.extend(outcome.problems)
                t, d, rto = outcome.t, outcome.d, outcome.rto_seconds
                if chain:
                    details["binlog"] = _binlog_details(outcome, backup_set)
                    warnings.append(_binlog_warning(outcome, backup_set))
                if warning:
                    warnings.append(warning)
            elif run.drill:
                t, d = 0.0, 0.0
            else:
                t, d = _storage_factors(check)
    except Exception as exc:  # the run fails and says why; the set keeps its previous Q
        return _verification_fail(run, str(exc) or exc.__class__.__name__)
    served = served_records_merge(
        [*(served_record(storage) for storage in storages.values()), *part_served]
    )
    # An object bad on one target but read from the next is named too (A counts it served).
    problems.extend(f for f in served["fallbacks"] if f.get("served_by"))
    return _verification_finish(
        run,
        t=t,
        d=d,
        a=a,
        rto=rto,
        problems=problems,
        warning=WARNING_SEPARATOR.join(warnings),
        drill_name=drill_name,
        details=details,
        served=served,
    )


WARNING_SEPARATOR = " | "


def _chain_storage_check(sets: list[BackupSet], storages: dict, *, progress) -> engine.StorageCheck:
    """The storage check of every set (one set, or an incremental's whole chain).

    A counts every object of every manifest; the problems name each bad object. The
    result's manifest is the first set's (the full set a drill restores), or None when
    any set's manifest is missing or unsigned: a chain is only as trustworthy as every
    one of its manifests, so A is then 0.
    """
    combined = engine.StorageCheck()
    manifests_ok = True
    for index, member in enumerate(sets):
        binding = set_manifest_binding(member)
        check = engine.storage_check(
            storages[member.pk],
            set_prefix(member),
            hmac_key=manifest_hmac_key(),
            data_key=set_data_key(member),
            progress=progress,
            expect_manifest_sha256=binding["expect_sha256"],
            expect_set_id=binding["expect_set_id"],
            expect_cluster=binding["expect_cluster"],
        )
        combined.objects_total += check.objects_total
        combined.objects_ok += check.objects_ok
        combined.problems.extend(check.problems)
        if check.manifest is None:
            manifests_ok = False
        elif index == 0:
            combined.manifest = check.manifest
    if not manifests_ok:
        combined.manifest = None
    return combined


def _roll_forward_through(chain: list[BackupSet], *, until) -> engine.RollForwardFn:
    """The drill's roll-forward: one shard's scratch database through `chain`'s binlog
    segments up to `until` (the drilled set's consistent point), with the restore's code."""

    def roll_forward(shard: dict, target, database: str):
        return chain_apply(
            chain=chain,
            shard=shard,
            target=target,
            target_database=database,
            until=until,
        )

    return roll_forward


def _binlog_details(outcome: engine.DrillOutcome, backup_set: BackupSet) -> dict:
    return {
        "until": backup_set.consistent_at.isoformat() if backup_set.consistent_at else None,
        "transactions": outcome.binlog_transactions,
        "events": outcome.binlog_events,
        "shards": {
            name: {
                "transactions": result.transactions,
                "events": result.events,
                "last_file": result.last_file,
                "last_pos": result.last_pos,
            }
            for name, result in sorted(outcome.rolled_forward.items())
        },
    }


def _binlog_warning(outcome: engine.DrillOutcome, backup_set: BackupSet) -> str:
    until = backup_set.consistent_at
    at = f"{until:%Y-%m-%d %H:%M:%S} UTC" if until else "its consistent point"
    return (
        f"warning: binlog roll-forward to {at} ({outcome.binlog_transactions} transactions, "
        f"{len(outcome.rolled_forward)} shards) proven by a successful apply only: "
        "no manifest checksum of the rolled-forward state"
    )


def _verification_finish(
    run, *, t, d, a, rto, problems, warning, drill_name="", details=None, served=None
) -> VerificationRun:
    q = engine.quality(t, d, a)
    now = timezone.now()
    with transaction.atomic():
        backup_set = lock_set(run.backup_set_id)
        run = VerificationRun.objects.select_for_update().get(pk=run.pk)
        run.t, run.d, run.a, run.q = round(t, 6), round(d, 6), round(a, 6), q
        run.rto_seconds = rto
        run.drill_instance_name = drill_name
        run.problems = problems
        run.served_by = served or {}
        run.status = VerificationStatus.SUCCEEDED
        run.finished_at = run.heartbeat_at = now
        run.progress_text = (warning or f"Q = {q:.4f}")[:300]
        run.save()
        previous_q = backup_set.q
        if not run.target:  # the set's Q is what a restore (with fallback) would get
            backup_set.q = q
            backup_set.verified_at = now
            backup_set.save(update_fields=["q", "verified_at"])
        audit_record(
            actor="worker",
            action="verification.finish",
            obj=run,
            details={
                "set": backup_set.pk,
                "drill": run.drill,
                "target": run.target,
                "served_by": run.served_by.get("objects", {}),
                "q": q,
                "t": run.t,
                "d": run.d,
                "a": run.a,
                "rto_seconds": rto,
                "problems": problems[:50],
                "warning": warning,
                **(details or {}),
            },
        )
        if q < 1.0:
            run_id = run.pk
            transaction.on_commit(lambda: _alert_quality(run_id, previous_q))
    return run


def _verification_fail(run, error: str) -> VerificationRun:
    with transaction.atomic():
        run = VerificationRun.objects.select_for_update().get(pk=run.pk)
        run.status = VerificationStatus.FAILED
        run.error = error[:2000]
        run.finished_at = timezone.now()
        run.progress_text = f"failed: {error}"[:300]
        run.save()
        audit_record(actor="worker", action="verification.fail", obj=run, details={"error": error})
        run_id = run.pk
        transaction.on_commit(lambda: _alert_quality(run_id, None))
    return run


def _alert_quality(run_id: int, previous_q: float | None) -> None:
    alert_quality_dropped(
        VerificationRun.objects.select_related("backup_set__cluster").get(pk=run_id)
    )


def verification_run_now(
    *, backup_set: BackupSet, user: Any = None, drill: bool = False, target: str = ""
) -> VerificationRun:
    """File and run a verification in this process (the `verify` command: no worker needed).

    A verification of the same kind that is queued but not yet started (the automatic check
    after a backup, waiting for a worker) is taken over and run here instead of refused.
    """
    if user is not None and not isinstance(user, str):
        require_role(user, OPERATOR, ADMIN, action="start a verification")
    queued = (
        VerificationRun.objects.filter(
            backup_set=backup_set, drill=drill, target=target, status=VerificationStatus.PENDING
        )
        .order_by("id")
        .first()
    )
    if queued is not None:
        run = verification_execute(verification_id=queued.pk)
        if run.finished_at is not None:
            return run
    run = verification_start(
        backup_set=backup_set, user=user, drill=drill, enqueue=False, target=target
    )
    return verification_execute(verification_id=run.pk)


def verification_summary(run: VerificationRun) -> dict:
    """The `verify --json` object (DESIGN.md's command-line contract)."""
    return {
        "set": run.backup_set_id,
        "verification": run.pk,
        "status": run.status,
        "q": run.q,
        "t": run.t,
        "d": run.d,
        "a": run.a,
        "drill": run.drill,
        "target": run.target or None,
        "served_by": dict((run.served_by or {}).get("objects", {})),
        "rto_seconds": run.rto_seconds,
        "drill_instance": run.drill_instance_name,
        "problems": list(run.problems or []),
        "warnings": [
            w for w in run.progress_text.split(WARNING_SEPARATOR) if w.startswith("warning: ")
        ],
        "error": run.error,
    }


def verifications_reap_stale(*, now=None) -> list[VerificationRun]:
    """Fail running verifications whose worker stopped writing heartbeats (it died).

    Without this a killed worker would leave the set "being verified" forever. The limit is
    generous (ten times JOB_HEARTBEAT_STALE_SECONDS) because one large chunk can load for a
    while between progress events. A drill's scratch databases are named
    `__svdrill_<id>_...`; the reason says so, for the operator to drop them.
    """
    now = now or timezone.now()
    limit = timedelta(seconds=10 * settings.JOB_HEARTBEAT_STALE_SECONDS)
    reaped = []
    candidates = VerificationRun.objects.filter(
        status=VerificationStatus.RUNNING, heartbeat_at__lt=now - limit
    ).values_list("pk", flat=True)
    for run_id in list(candidates):
        with transaction.atomic():
            run = VerificationRun.objects.select_for_update().get(pk=run_id)
            if run.status != VerificationStatus.RUNNING or run.heartbeat_at >= now - limit:
                continue
            reason = f"the worker stopped reporting at {run.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC"
            if run.drill:
                reason += f"; scratch databases {engine.DRILL_PREFIX}{run.pk}_* may be left behind"
            run.status = VerificationStatus.FAILED
            run.error = reason
            run.finished_at = now
            run.progress_text = f"failed: {reason}"[:300]
            run.save()
            audit_record(
                actor="system", action="verification.fail", obj=run, details={"error": reason}
            )
            reaped.append(run)
    return reaped


# ---------------------------------------------------------------- drills spread over workers

DRILL_PART_FUNCTION = "backups.services.verification.drill_part"
DRILL_SHARD_GROUPS = 3  # parts of a drill onto one drill instance

_DRILL_OWNERS: dict[int, Any] = {}  # verification id -> its owner's progress, in this process


def _drill_groups(
    doc: dict, targets: dict, drill_name: str, *, max_groups: int = DRILL_SHARD_GROUPS
) -> list[list[str]]:
    """The shards of each part of a drill (DESIGN.md "Scale-out").

    Without a drill instance each shard restores onto its own server: one part per target
    server. Onto one drill instance: up to DRILL_SHARD_GROUPS groups of shards, shards
    that share a database name in the same group (their scratch databases are told apart
    by one `drill_run`).
    """
    shards = [s.get("name", "") for s in engine.manifest_shards(doc)]
    if not drill_name:
        by_server: dict[str, list[str]] = {}
        for name in shards:
            by_server.setdefault(targets[name].address, []).append(name)
        return [by_server[a] for a in sorted(by_server)]
    by_database: dict[str, list[str]] = {}
    for shard in engine.manifest_shards(doc):
        by_database.setdefault(shard.get("database", ""), []).append(shard.get("name", ""))
    count = max(1, min(DRILL_SHARD_GROUPS, max_groups, len(by_database)))
    groups: list[list[str]] = [[] for _ in range(count)]
    for i, database in enumerate(sorted(by_database)):
        groups[i % count].extend(by_database[database])
    return [g for g in groups if g]


def _drill_subset(doc: dict, shard_names: list[str]) -> dict:
    """The manifest with only `shard_names` (what one part drills)."""
    wanted = set(shard_names)
    return {**doc, "shards": [s for s in engine.manifest_shards(doc) if s.get("name") in wanted]}


def _drill_scratch(doc: dict, targets: dict, verification_id: int) -> list[tuple]:
    """The scratch databases `drill_run` creates for `doc` (to drop a dead part's)."""
    used: set[tuple[str, str]] = set()
    scratch = []
    for shard in engine.manifest_shards(doc):
        name = shard.get("name", "")
        database = engine.drill_database_name(verification_id, shard.get("database", name))
        if (targets[name].address, database) in used:
            database = engine.drill_database_name(
                verification_id, shard.get("database", name), name
            )
        used.add((targets[name].address, database))
        scratch.append((targets[name], database))
    return scratch


def drill_part(
    ctx: PartContext, verification_id: int, doc: dict, parallel: int = engine.DRILL_PARALLEL
) -> dict:
    """One part of a drill: restore the shards of `doc` (the part's share of the manifest
    the owner read and checked) into scratch databases, compare checksums, drop them;
    returns the part's DrillOutcome as JSON (what the owner merges)."""
    close_old_connections()
    run = VerificationRun.objects.select_related("backup_set__cluster").get(pk=verification_id)
    backup_set = run.backup_set
    full_set, chain = backup_set, []
    if backup_set.kind == BackupSet.Kind.INCREMENTAL:
        full_set, chain = _drill_chain(backup_set)
    storage = set_read_storage(full_set, target=run.target)
    instances, drill_name, _warning = _drill_target_instances(full_set, doc)
    # The owner checked the drill instance's identity and holds the slots for every part.
    targets = _drill_targets(full_set, instances, drill_name, check_identity=False)
    roll_forward = _roll_forward_through(chain, until=backup_set.consistent_at) if chain else None
    throttles = {} if drill_name else _drill_throttles(backup_set, targets)
    local = _DRILL_OWNERS.get(verification_id) if ctx.local else None
    try:
        outcome = engine.drill_run(
            doc,
            storage,
            verification_id=verification_id,
            targets=targets,
            data_key=set_data_key(full_set),
            progress=local if local is not None else (lambda event: None),
            should_cancel=ctx.aborted,
            roll_forward=roll_forward,
            throttles=throttles,
            parallel=parallel,
        )
    finally:
        for gate in {id(g): g for g in throttles.values()}.values():
            gate.close()
        connections.close_all()
    return {
        "tables": [dataclasses.asdict(t) for t in outcome.tables],
        "problems": outcome.problems,
        "error": outcome.error,
        "dropped": outcome.dropped,
        "rolled_forward": {
            name: {
                "transactions": r.transactions,
                "events": r.events,
                "last_file": r.last_file,
                "last_pos": r.last_pos,
            }
            for name, r in outcome.rolled_forward.items()
        },
        "served_by": served_record(storage),
    }


def _drill_in_parts(
    run: VerificationRun,
    doc: dict,
    targets: dict,
    drill_name: str,
    progress,
    tracker,
    parallel: int,
) -> tuple[engine.DrillOutcome, list[dict], list[str]]:
    """Run a drill as parts on the `verify` queue; (merged outcome, served records, workers).

    `parallel` is how many loads the drill's connection slots allow on each server; parts
    sharing the drill instance share it (fewer groups when it is small). RTO is the wall
    time of all parts. A part that fails or whose worker dies fails the drill
    (VerificationError) after its scratch databases were dropped.
    """
    groups = _drill_groups(doc, targets, drill_name, max_groups=parallel)
    per_part = max(1, parallel // len(groups)) if drill_name else parallel
    parts = [
        Part(name=f"g{i}", args=(run.pk, _drill_subset(doc, names), per_part))
        for i, names in enumerate(groups)
    ]
    outcome = engine.DrillOutcome()
    for shard in engine.manifest_shards(doc):
        for table in shard.get("tables") or []:
            outcome.tables_total += 1
            outcome.rows_total += int(table.get("rows") or 0)
    tracker.say(f"drill: restoring {len(groups)} shard group(s) into scratch databases")
    _DRILL_OWNERS[run.pk] = progress
    started = time.monotonic()
    try:
        results = parts_run(
            owner=f"verify-{run.pk}",
            parts=parts,
            function=DRILL_PART_FUNCTION,
            queue_name=queue.VERIFY,
        )
    except (PartFailed, PartsCancelled) as exc:
        # A killed part could not drop what it created: drop its scratch databases here.
        for part in parts:
            if not (exc.outcomes.get(part.name) and exc.outcomes[part.name].ok):
                engine.drill_cleanup(_drill_scratch(part.args[1], targets, run.pk))
        raise VerificationError(f"drill {exc}") from exc
    finally:
        _DRILL_OWNERS.pop(run.pk, None)
    outcome.rto_seconds = time.monotonic() - started
    outcome.dropped = True
    served, workers = [], []
    for part in parts:
        result = results[part.name]
        workers.append(result.worker)
        doc_part = result.result or {}
        outcome.tables.extend(engine.DrillTable(**t) for t in doc_part.get("tables", []))
        outcome.problems.extend(doc_part.get("problems", []))
        outcome.error = outcome.error or doc_part.get("error", "")
        outcome.dropped = outcome.dropped and bool(doc_part.get("dropped"))
        for name, r in doc_part.get("rolled_forward", {}).items():
            outcome.rolled_forward[name] = ApplyResult(**r)
        served.append(doc_part.get("served_by", {}))
    return outcome, served, workers
