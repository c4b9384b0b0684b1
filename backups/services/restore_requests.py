"""Restore requests and their approvals: every state transition, one function each (DESIGN.md).

File a request, approve or reject it, expire it past its deadline. Together with
`restore_run_states` (a run's start, begin, finish and cancel) nothing else changes
`RestoreRequest.state` or `RestoreRun.status`. Each transition locks its rows, checks the
current state, writes an audit event in the same transaction and defers mail to
`transaction.on_commit`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backups.models import Approval, BackupSet, RestoreRequest
from backups.services.alerts import notify_decision, notify_request_filed
from backups.services.errors import ChainError, RestoreDenied, RestoreError
from backups.services.pitr import pitr_resolve, pitr_resolve_gtid, pitr_resolve_positions
from backups.services.rebuild_plan import rebuild_plan_build, rebuild_source_resolve
from backups.services.restore_plan import restore_plan_build
from backups.status import RequestState, SetStatus
from console.audit import audit_record
from console.roles import APPROVER, OPERATOR, has_role
from shards.models import Cluster, Instance

State = RequestState
Target = RestoreRequest.Target
Decision = Approval.Decision


def parse_target(*, cluster: Cluster, target: str) -> tuple[str, Instance | None]:
    """`side`, `inplace` or `instance:NAME` -> (kind, instance); unknown names are refused."""
    target = (target or "").strip()
    if target in (Target.SIDE, Target.INPLACE):
        return target, None
    if target.startswith("rebuild:"):
        name = target.split(":", 1)[1].strip()
        instance = Instance.objects.filter(cluster=cluster, name=name).first() if name else None
        if instance is None:
            raise RestoreError(
                f"rebuild:{name} names no instance of cluster {cluster.name}"
                if name
                else "the target rebuild:INSTANCE needs an instance name"
            )
        return Target.REBUILD, instance
    if target.startswith("instance:"):
        name = target.split(":", 1)[1].strip()
        if not name:
            raise RestoreError("the target instance:NAME needs an instance name")
        instance = Instance.objects.filter(cluster=cluster, name=name).first()
        if instance is None:
            candidates = list(Instance.objects.filter(name=name)[:2])
            if len(candidates) == 1:
                instance = candidates[0]
        if instance is None:
            raise RestoreError(f"no registered instance named {name!r}")
        return Target.INSTANCE, instance
    raise RestoreError(
        f"unknown target {target!r}: use side, inplace, instance:NAME or rebuild:INSTANCE"
    )


def _required_approvals(cluster: Cluster, kind: str) -> int:
    if kind in (Target.INPLACE, Target.REBUILD):
        return max(2, cluster.approvals_required_inplace or 2)
    return max(1, cluster.approvals_required_side or 1)


def restore_source_resolve(*, cluster: Cluster, source_set: BackupSet | None, at: datetime | None):
    """The full set a request for `source_set` or `at` restores from (RestoreError if none)."""
    if source_set is not None and at is not None:
        raise RestoreError("give either a backup set or a point in time, not both")
    if source_set is None and at is None:
        raise RestoreError("give a backup set or a point in time to restore from")
    if source_set is not None:
        if source_set.cluster_id != cluster.pk:
            raise RestoreError(f"backup set {source_set.pk} belongs to another cluster")
        if source_set.status != SetStatus.SUCCEEDED:
            raise RestoreError(
                f"backup set {source_set.pk} is {source_set.status}; only succeeded sets can be restored"
            )
        if source_set.kind != BackupSet.Kind.FULL:
            raise RestoreError(
                f"backup set {source_set.pk} is an incremental; restore it with --at instead"
            )
        if source_set.method == BackupSet.Method.PHYSICAL:
            raise RestoreError(
                f"backup set {source_set.pk} is a physical copy of whole instances; restore it "
                "with --target rebuild:INSTANCE --datadir PATH"
            )
        return source_set
    if timezone.is_naive(at):
        at = at.replace(tzinfo=UTC)
    try:
        full_set, _chain = pitr_resolve(cluster=cluster, at=at)
    except ChainError as exc:
        raise RestoreError(str(exc)) from exc
    return full_set


def _source_lock(full_set: BackupSet) -> None:
    """Lock the source set for the filing transaction and refuse one retention is removing
    (retention locks the same row, so a request and a removal never pass each other)."""
    locked = BackupSet.objects.select_for_update().get(pk=full_set.pk)
    if locked.status != SetStatus.SUCCEEDED:
        raise RestoreError(
            f"backup set {locked.pk} is {locked.status}; only succeeded sets can be restored"
        )
    if locked.expiring_since is not None:
        raise RestoreError(
            f"backup set {locked.pk} is being removed by retention; it cannot be restored"
        )


def restore_stop_resolve(
    *,
    cluster: Cluster,
    source_set: BackupSet | None = None,
    at: datetime | None = None,
    before_gtid: str = "",
    until=(),
) -> tuple[BackupSet, datetime | None, list[dict]]:
    """(full set, at, stop positions) for `--before-gtid` or `--until` (RestoreError if refused)."""
    if source_set is not None or at is not None or (before_gtid and until):
        raise RestoreError(
            "give one source: a backup set, a point in time, --before-gtid or --until"
        )
    try:
        if before_gtid:
            full_set, at, stop = pitr_resolve_gtid(cluster=cluster, gtid=before_gtid)
            return full_set, at, [stop]
        full_set, positions = pitr_resolve_positions(cluster=cluster, until=list(until))
    except ChainError as exc:
        raise RestoreError(str(exc)) from exc
    return full_set, None, positions


def restore_request_file(
    *,
    cluster: Cluster,
    requester,
    source_set: BackupSet | None = None,
    at: datetime | None = None,
    shards=(),
    tables=(),
    target: str,
    reason: str,
    before_gtid: str = "",
    until=(),
    datadir: str = "",
) -> RestoreRequest:
    """File a request (operators, admins). Refuses bad scope, conflicts and unreadable sets.

    The source is a set, a time `at`, a `before_gtid` (its shard stops right before it,
    the others at its commit second) or `until` positions (INSTANCE:FILE:POS, one per
    instance in scope); a GTID or position no stored incremental covers is refused,
    naming what is covered. The plan (objects, rows, bytes, targets, storage check,
    stop point per shard, estimate) is computed in the same transaction, after the row
    exists, because side databases are named by its id. `rebuild:INSTANCE` takes a
    physical set (and optionally `at` as well) and `datadir`, the empty data directory to
    rebuild into; it needs two approvals like `inplace`.
    """
    if not has_role(requester, OPERATOR):
        raise RestoreDenied(f"{requester.get_username()} may not request restores (operators only)")
    reason = (reason or "").strip()
    if not reason:
        raise RestoreError("a restore request needs a reason")
    kind, instance = parse_target(cluster=cluster, target=target)
    before_gtid = (before_gtid or "").strip()
    until = [u.strip() for u in until or () if u and u.strip()]
    datadir = (datadir or "").strip()
    stop_positions = []
    if kind == Target.REBUILD:
        if not datadir:
            raise RestoreError("a rebuild needs --datadir PATH: the empty data directory to fill")
        if before_gtid or until:
            raise RestoreError("a rebuild rolls forward to --at only, not --before-gtid or --until")
        full_set = rebuild_source_resolve(cluster=cluster, source_set=source_set, at=at)
    elif before_gtid or until:
        if datadir:
            raise RestoreError("--datadir is only for --target rebuild:INSTANCE")
        full_set, at, stop_positions = restore_stop_resolve(
            cluster=cluster, source_set=source_set, at=at, before_gtid=before_gtid, until=until
        )
    else:
        if datadir:
            raise RestoreError("--datadir is only for --target rebuild:INSTANCE")
        full_set = restore_source_resolve(cluster=cluster, source_set=source_set, at=at)
    shards = [s.strip() for s in shards if s and s.strip()]
    tables = [t.strip() for t in tables if t and t.strip()]
    now = timezone.now()
    with transaction.atomic():
        _source_lock(full_set)
        request = RestoreRequest.objects.create(
            cluster=cluster,
            source_set=full_set,
            at=at,
            before_gtid=before_gtid,
            stop_positions=stop_positions,
            scope={"shards": shards, "tables": tables},
            target_kind=kind,
            target_instance=instance,
            datadir=datadir,
            reason=reason,
            requested_by=requester,
            approvals_required=_required_approvals(cluster, kind),
            expires_at=now + timedelta(hours=settings.RESTORE_REQUEST_TTL_HOURS),
        )
        if kind == Target.REBUILD:
            plan = rebuild_plan_build(
                cluster=cluster,
                source_set=full_set,
                instance=instance,
                datadir=datadir,
                at=at,
                shards=shards,
                tables=tables,
            )
        else:
            plan = restore_plan_build(
                cluster=cluster,
                source_set=full_set,
                at=at,
                shards=shards,
                tables=tables,
                target_kind=kind,
                target_instance=instance,
                request_id=request.pk,
                before_gtid=before_gtid,
                stop_positions=stop_positions,
            )
        RestoreRequest.objects.filter(pk=request.pk).update(plan=plan)
        request.plan = plan
        audit_record(
            actor=requester,
            action="restore.requested",
            obj=request,
            details={
                "cluster": cluster.name,
                "source_set": full_set.pk,
                "at": at.isoformat() if at else None,
                "before_gtid": before_gtid or None,
                "until": until or None,
                "scope": request.scope,
                "target": request.target_label,
                "datadir": datadir,
                "reason": reason,
                "approvals_required": request.approvals_required,
            },
        )
        transaction.on_commit(lambda: notify_request_filed(request_id=request.pk))
    return request


def restore_request_lock(request: RestoreRequest) -> RestoreRequest:
    """The request's row, locked for this transaction (with its cluster)."""
    return RestoreRequest.objects.select_for_update().select_related("cluster").get(pk=request.pk)


def restore_request_expire_if_due(locked: RestoreRequest, now: datetime) -> bool:
    """Move a pending or approved (not yet run) request past its deadline to expired.

    `locked` must be locked by the caller's transaction (`restore_request_lock`).
    """
    if locked.state in (State.PENDING_APPROVAL, State.APPROVED) and locked.expires_at <= now:
        # A run that was queued but never began does not keep an approval alive.
        if locked.state == State.APPROVED and locked.runs.filter(started_at__isnull=False).exists():
            return False
        previous = locked.state
        locked.state = State.EXPIRED
        locked.save(update_fields=["state"])
        audit_record(
            actor="system",
            action="restore.expired",
            obj=locked,
            details={"was": previous, "expires_at": locked.expires_at.isoformat()},
        )
        return True
    return False


_VERBS = {Decision.APPROVE: ("approve", "approved"), Decision.REJECT: ("reject", "rejected")}


def _decider_refusal(request: RestoreRequest, user, verb: str) -> RestoreError | None:
    """Who may decide: never the requester, and only approvers."""
    # The requester is refused first: no role, superuser or admin shortcut overrides this.
    if request.requested_by_id == getattr(user, "pk", None):
        return RestoreDenied(f"you requested restore {request.pk}; someone else must {verb} it")
    if not has_role(user, APPROVER):
        return RestoreDenied(f"{user.get_username()} may not {verb} restores (approvers only)")
    return None


def _decision_state_refusal(request: RestoreRequest, user, participle: str) -> RestoreError | None:
    """When a decision is possible: while the request waits, once per approver."""
    if request.state != State.PENDING_APPROVAL:
        return RestoreError(f"restore {request.pk} is {request.state}; it cannot be {participle}")
    if request.approvals.filter(approver=user).exists():
        return RestoreError(f"you already decided on restore {request.pk}")
    return None


def restore_request_decision_allowed(*, request: RestoreRequest, user) -> bool:
    """Whether `user` may approve or reject `request` now.

    The same rule `restore_request_approve` and `restore_request_reject` enforce (they
    also expire a request past its deadline first); pages ask it to offer the buttons.
    """
    refusal = _decider_refusal(request, user, "decide on") or _decision_state_refusal(
        request, user, "decided"
    )
    return refusal is None


def _decide(*, request: RestoreRequest, approver, comment: str, decision: str) -> RestoreRequest:
    """The one decision path: lock, check the rule, expire if due, record, audit, notify."""
    verb, participle = _VERBS[decision]
    now = timezone.now()
    expired = False
    with transaction.atomic():
        locked = restore_request_lock(request)
        refusal = _decider_refusal(locked, approver, verb)
        if refusal is not None:
            raise refusal
        if decision == Decision.REJECT and not comment:
            raise RestoreError("a rejection needs a comment saying why")
        expired = restore_request_expire_if_due(locked, now)
        if not expired:
            refusal = _decision_state_refusal(locked, approver, participle)
            if refusal is not None:
                raise refusal
            Approval.objects.create(
                request=locked, approver=approver, decision=decision, comment=comment
            )
            if decision == Decision.APPROVE:
                count = locked.approvals.filter(decision=Decision.APPROVE).count()
                details = {
                    "comment": comment,
                    "approvals": count,
                    "required": locked.approvals_required,
                }
                if count >= locked.approvals_required:
                    locked.state = State.APPROVED
                    locked.approved_at = now
                    locked.decided_at = now
                    # From here the clock is the approval's: it lapses if no run starts in time.
                    locked.expires_at = now + timedelta(hours=settings.RESTORE_APPROVAL_TTL_HOURS)
                    locked.save(update_fields=["state", "approved_at", "decided_at", "expires_at"])
                details["state"] = locked.state
            else:
                locked.state = State.REJECTED
                locked.decided_at = now
                locked.save(update_fields=["state", "decided_at"])
                details = {"comment": comment}
            audit_record(
                actor=approver, action=f"restore.{participle}", obj=locked, details=details
            )
            transaction.on_commit(
                lambda: notify_decision(request_id=locked.pk, decision=decision, by=approver.pk)
            )
    if expired:
        raise RestoreError(f"restore {locked.pk} has expired; file a new request")
    request.refresh_from_db()
    return request


def restore_request_approve(
    *, request: RestoreRequest, approver, comment: str = ""
) -> RestoreRequest:
    """One approval; the request becomes `approved` once enough distinct approvers signed."""
    return _decide(request=request, approver=approver, comment=comment, decision=Decision.APPROVE)


def restore_request_reject(*, request: RestoreRequest, approver, comment: str) -> RestoreRequest:
    """Reject (final). A comment saying why is required."""
    return _decide(
        request=request,
        approver=approver,
        comment=(comment or "").strip(),
        decision=Decision.REJECT,
    )


def restore_requests_expire(*, now: datetime | None = None) -> int:
    """Expire pending requests past their deadline and approvals that were never run."""
    now = now or timezone.now()
    count = 0
    due = RestoreRequest.objects.filter(
        state__in=(State.PENDING_APPROVAL, State.APPROVED), expires_at__lte=now
    ).order_by("pk")
    for pk in due.values_list("pk", flat=True):
        with transaction.atomic():
            locked = RestoreRequest.objects.select_for_update().get(pk=pk)
            if restore_request_expire_if_due(locked, now):
                count += 1
    return count
