"""What to alert about, composed from the backups models; `notify` delivers it.

Alerts (an email, and a JSON webhook per cluster: BackupPolicy.webhook_url) are raised when
a backup fails, when a verification drops a set's Q below 1 (or cannot run), and when a
cluster's newest recoverable point is older than its RPO target. Restore notifications
mail approvers and requesters as a request is filed, decided and run.

Call these after the state change has committed (`transaction.on_commit`), with ids where
they take ids, so a mail is only sent for a change that really happened. A failing mail
server or webhook is logged and never breaks the caller.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Max, Q
from django.utils import timezone

import notify
from backups.models import BackupSet, RestoreRequest, RestoreRun, SetCopy, VerificationRun
from backups.selectors.verification import cluster_rpo_target
from backups.services.webhooks import webhook_event
from backups.status import SetStatus
from console.roles import ADMIN, APPROVER, OPERATOR
from shards.models import Cluster


def _alert(*, kind: str, cluster: Cluster, subject: str, body: str, payload: dict) -> dict:
    """Send one alert by email (SHARDVAULT_ALERT_EMAILS, else every admin and operator) and,
    when the cluster's policy names one, as a signed webhook (queued, retried with backoff).

    Returns {"email": bool, "webhook": bool|None} (None: no webhook configured; True: queued).
    """
    configured = list(settings.ALERT_EMAILS)
    sent = notify.send(
        subject=subject,
        body=body,
        emails=configured,
        roles=() if configured else (ADMIN, OPERATOR),
    )
    document = webhook_event(cluster, kind, {"alert": kind, "subject": subject, **payload})
    sent["webhook"] = None if document is None else True
    return sent


def alert_backup_failed(backup_set: BackupSet) -> dict | None:
    """Mail (and webhook) that a set failed; once per set, however often it is called."""
    if not notify.first_time(f"alert:backup-failed:{backup_set.pk}", seconds=14 * 24 * 3600):
        return None
    cluster = backup_set.cluster
    subject = f"backup set {backup_set.pk} of {cluster.name} failed"
    body = f"{subject}.\n\nReason: {backup_set.error or 'not recorded'}\n"
    return _alert(
        kind="backup_failed",
        cluster=cluster,
        subject=subject,
        body=body,
        payload={"set": backup_set.pk, "kind": backup_set.kind, "error": backup_set.error},
    )


def alert_copy_failed(copy: SetCopy) -> dict | None:
    """A set's copy to a storage target failed after its last retry; once per copy."""
    if not notify.first_time(f"alert:copy-failed:{copy.pk}", seconds=14 * 24 * 3600):
        return None
    backup_set = copy.backup_set
    cluster = backup_set.cluster
    subject = f"copy of backup set {backup_set.pk} of {cluster.name} to {copy.target} failed"
    body = (
        f"{subject} after {copy.attempts} attempts.\n\nReason: {copy.error or 'not recorded'}\n"
        "The set itself is intact on its other targets.\n"
    )
    return _alert(
        kind="copy_failed",
        cluster=cluster,
        subject=subject,
        body=body,
        payload={
            "set": backup_set.pk,
            "target": copy.target,
            "attempts": copy.attempts,
            "error": copy.error,
        },
    )


def alert_quality_dropped(verification: VerificationRun) -> dict | None:
    """A verification gave Q < 1, or could not run at all."""
    backup_set = verification.backup_set
    cluster = backup_set.cluster
    if verification.q is not None and verification.q >= 1.0:
        return None
    what = "drill" if verification.drill else "storage check"
    on = f" on storage target {verification.target}" if verification.target else ""
    if verification.q is None:
        subject = f"{what} of set {backup_set.pk} of {cluster.name}{on} could not run"
    else:
        subject = f"set {backup_set.pk} of {cluster.name}{on} has Q = {verification.q:.4f} < 1"
    lines = [f"{subject}.", ""]
    if verification.q is not None:
        lines.append(f"T = {verification.t}, D = {verification.d}, A = {verification.a} ({what})")
    if verification.error:
        lines.append(f"Error: {verification.error}")
    for problem in (verification.problems or [])[:20]:
        lines.append(f"- {problem.get('object') or problem.get('table')}: {problem.get('reason')}")
    return _alert(
        kind="quality_dropped",
        cluster=cluster,
        subject=subject,
        body="\n".join(lines) + "\n",
        payload={
            "set": backup_set.pk,
            "verification": verification.pk,
            "drill": verification.drill,
            "target": verification.target or None,
            "q": verification.q,
            "t": verification.t,
            "d": verification.d,
            "a": verification.a,
            "problems": (verification.problems or [])[:50],
            "error": verification.error,
        },
    )


def alerts_check_failed_backups(*, now=None, window_hours: int = 48) -> list[int]:
    """Alert for sets that failed recently and were not alerted yet (housekeeping backstop
    for callers that did not call `alert_backup_failed` themselves). Returns the set ids."""
    now = now or timezone.now()
    failed = BackupSet.objects.filter(
        status=SetStatus.FAILED, created_at__gte=now - timedelta(hours=window_hours)
    ).select_related("cluster__policy")
    return [s.pk for s in failed.iterator() if alert_backup_failed(s) is not None]


def alerts_check_rpo(*, now=None) -> list[str]:
    """Alert for every cluster whose newest recoverable point is older than its RPO target.

    Sends once per breach (remembered in the cache until a newer point appears).
    Returns the names of the clusters alerted.
    """
    now = now or timezone.now()
    alerted = []
    clusters = Cluster.objects.select_related("policy").annotate(
        newest=Max(
            "backup_sets__consistent_at",
            filter=Q(backup_sets__status=SetStatus.SUCCEEDED),
        )
    )
    for cluster in clusters:
        rpo = cluster_rpo_target(cluster)
        newest = cluster.newest
        if newest is not None and now - newest <= rpo:
            continue
        marker = f"rpo-alert:{cluster.pk}:{newest.isoformat() if newest else 'none'}"
        if not notify.first_time(marker, seconds=7 * 24 * 3600):
            continue
        age = (
            "no recoverable point at all"
            if newest is None
            else f"newest recoverable point is {newest:%Y-%m-%d %H:%M} UTC"
        )
        subject = f"{cluster.name} is past its RPO target"
        _alert(
            kind="rpo_breached",
            cluster=cluster,
            subject=subject,
            body=f"{subject}: {age}, target {rpo}.\n",
            payload={
                "newest_recoverable_at": newest.isoformat() if newest else None,
                "rpo_target_minutes": int(rpo.total_seconds() // 60),
            },
        )
        alerted.append(cluster.name)
    return alerted


# ------------------------------------------------------------------ restore notifications


def _describe(request: RestoreRequest) -> str:
    plan = request.plan or {}
    scope = request.scope or {}
    source = f"backup set {request.source_set_id}" + (
        f" rolled forward to {request.at.isoformat()}" if request.at else ""
    )
    if request.flashback:
        undo = request.flashback.get("gtids") or [
            f"{request.flashback.get('since')}..{request.flashback.get('until')}"
        ]
        source = f"flashback (undo in place) of {', '.join(undo)}; SQL sha256 " + (
            request.artifact_sha256 or "-"
        )
    return (
        f"Cluster: {request.cluster.name}\n"
        f"Source: {source}\n"
        f"Scope: shards {', '.join(scope.get('shards') or ['all'])}; "
        f"tables {', '.join(scope.get('tables') or ['all'])}\n"
        f"Target: {request.target_label}\n"
        f"Plan: {plan.get('objects', 0)} objects, {plan.get('rows', 0)} rows, "
        f"{plan.get('bytes', 0)} bytes; {plan.get('estimate', '')}\n"
        f"Reason: {request.reason}\n"
        f"Requested by: {request.requested_by.get_username()}\n"
    )


def notify_request_filed(*, request_id: int) -> None:
    """Tell every approver (except the requester) that a request awaits a decision."""
    request = RestoreRequest.objects.select_related("cluster", "requested_by").get(pk=request_id)
    notify.send(
        subject=f"restore {request.pk} awaits your approval ({request.target_label}, {request.cluster.name})",
        body=_describe(request)
        + f"\nIt needs {request.approvals_required} approval(s) from approvers other than the requester.\n",
        roles=(APPROVER, ADMIN),
        exclude_user_id=request.requested_by_id,
    )
    webhook_event(request.cluster, "restore_requested", _restore_payload(request))


def notify_decision(*, request_id: int, decision: str, by: int) -> None:
    """Tell the requester about each approval or the rejection."""
    request = RestoreRequest.objects.select_related("cluster", "requested_by").get(pk=request_id)
    approval = request.approvals.filter(approver_id=by).select_related("approver").first()
    who = approval.approver.get_username() if approval else "an approver"
    comment = approval.comment if approval else ""
    verb = "approved" if decision == "approve" else "rejected"
    notify.send(
        subject=f"restore {request.pk} {verb} by {who} (now {request.state})",
        body=_describe(request)
        + f"\n{who} {verb} it"
        + (f": {comment}" if comment else ".")
        + "\n",
        emails=[request.requested_by.email],
    )
    webhook_event(
        request.cluster,
        "restore_approved" if decision == "approve" else "restore_rejected",
        {**_restore_payload(request), "by": who, "comment": comment},
    )


def notify_run_finished(*, run_id: int) -> None:
    """Tell the requester how the run ended, with its verification quality."""
    run = RestoreRun.objects.select_related(
        "request", "request__cluster", "request__requested_by"
    ).get(pk=run_id)
    request = run.request
    q = f"{run.q:.3f}" if run.q is not None else "n/a"
    notify.send(
        subject=f"restore {request.pk} {run.status} (Q = {q})",
        body=_describe(request)
        + f"\nRun {run.pk}: {run.status}. Q = {q}."
        + (f"\nError: {run.error}" if run.error else "")
        + "\n",
        emails=[request.requested_by.email],
    )
    webhook_event(
        request.cluster,
        f"restore_{run.status}",
        {**_restore_payload(request), "run": run.pk, "q": run.q, "error": run.error},
    )


def _restore_payload(request: RestoreRequest) -> dict:
    return {
        "request": request.pk,
        "state": request.state,
        "source_set": request.source_set_id,
        "target": request.target_label,
        "requested_by": request.requested_by.get_username(),
    }
