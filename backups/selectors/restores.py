"""Read-side queries for restores."""

from __future__ import annotations

from django.db.models import QuerySet

from backups.models import Approval, RestoreRequest, RestoreRun
from console.models import AuditEvent


def restore_requests_awaiting_count(*, user) -> int:
    """Requests this user could still approve (not their own, not yet decided by them)."""
    return restore_requests_awaiting(user=user).count()


def restore_requests_awaiting(*, user) -> QuerySet[RestoreRequest]:
    return (
        RestoreRequest.objects.filter(state=RestoreRequest.State.PENDING_APPROVAL)
        .exclude(requested_by=user)
        .exclude(approvals__approver=user)
        .select_related("cluster", "requested_by", "target_instance")
    )


def restore_request_list(*, limit: int = 200) -> QuerySet[RestoreRequest]:
    return RestoreRequest.objects.select_related("cluster", "requested_by", "target_instance")[
        :limit
    ]


def restore_request_get(*, pk: int) -> RestoreRequest:
    return RestoreRequest.objects.select_related(
        "cluster", "requested_by", "target_instance", "source_set"
    ).get(pk=pk)


def restore_request_latest_run(*, request: RestoreRequest) -> RestoreRun | None:
    return RestoreRun.objects.filter(request=request).order_by("-id").first()


def restore_request_approvals(*, request: RestoreRequest) -> QuerySet[Approval]:
    return request.approvals.select_related("approver").order_by("at", "id")


def restore_request_timeline(*, request: RestoreRequest) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(
        object_type="backups.restorerequest", object_id=str(request.pk)
    ).order_by("id")


FLASHBACK_PLAN_KEYS = (
    "statements",
    "flashback_tables",
    "sample",
    "conflicts",
    "conflict_sample",
    "transactions",
)


def restore_request_as_dict(*, request: RestoreRequest) -> dict:
    """The JSON object of the `restore` commands (DESIGN.md keys; more may be added)."""
    run = restore_request_latest_run(request=request)
    results = []
    if run is not None:
        results = [
            {
                "shard": r.shard_name,
                "database": r.database,
                "table": r.table,
                "target_instance": r.target_instance_name,
                "target_database": r.target_database,
                "target_table": r.target_table,
                "rows": r.rows,
                "rows_expected": r.rows_expected,
                "checksum_ok": r.checksum_ok,
                "worker": r.worker,  # host:pid of the part's worker that restored it
            }
            for r in run.results.all()
        ]
    return {
        "id": request.pk,
        "state": request.state,
        "cluster": request.cluster.name,
        "source_set": request.source_set_id,
        "at": request.at.isoformat() if request.at else None,
        "scope": request.scope,
        "target": request.target_label,
        "requested_by": request.requested_by.get_username(),
        "reason": request.reason,
        "approvals_required": request.approvals_required,
        "approvals": [
            {
                "by": a.approver.get_username(),
                "decision": a.decision,
                "comment": a.comment,
                "at": a.at.isoformat(),
            }
            for a in restore_request_approvals(request=request)
        ],
        "plan": {
            k: request.plan.get(k)
            for k in ("objects", "rows", "bytes", "estimate", "target_databases")
            + (FLASHBACK_PLAN_KEYS if request.flashback else ())
            + (("datadir", "steps", "estimate_seconds") if request.datadir else ())
        }
        if request.plan
        else {},
        "datadir": request.datadir or None,
        "run": (
            {
                "id": run.pk,
                "status": run.status,
                "job_id": run.job_id,
                "rows_done": run.rows_done,
                "t": run.t,
                "d": run.d,
                "a": run.a,
            }
            if run
            else None
        ),
        "results": results,
        # Where each shard stopped (point-in-time restores): file, pos, gtid, time, reached.
        "before_gtid": request.before_gtid or None,
        "until": [
            f"{p['instance']}:{p['file']}:{p['pos']}"
            for p in request.stop_positions
            if not request.before_gtid
        ],
        "stop_points": (run.stop_points if run else []) or [],
        "planned_stops": request.plan.get("stops", []) if request.plan else [],
        "flashback": request.flashback or None,
        "artifact": (
            {"sha256": request.artifact_sha256, "bytes": request.artifact_bytes}
            if request.artifact_key
            else None
        ),
        "q": run.q if run else None,
        "error": (run.error if run and run.error else request.error) or None,
    }
