"""Restore emails (Django's mail framework; console backend by default).

Called from `transaction.on_commit` by the restore services, with ids, so a mail is
only sent for a change that really happened. A mail that cannot be sent is logged,
never allowed to undo or fail the change it reports.
"""

from __future__ import annotations

import logging

from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db.models import Q

from backups.models import RestoreRequest, RestoreRun
from console.roles import ADMIN, APPROVER

log = logging.getLogger(__name__)


def _send(subject: str, body: str, recipients: list[str]) -> None:
    recipients = sorted({r for r in recipients if r})
    if not recipients:
        return
    try:
        send_mail(subject, body, None, recipients)
    except Exception:  # noqa: BLE001 - a mail outage must not break restores
        log.exception("could not send mail %r", subject)


def _describe(request: RestoreRequest) -> str:
    plan = request.plan or {}
    scope = request.scope or {}
    return (
        f"Cluster: {request.cluster.name}\n"
        f"Source: backup set {request.source_set_id}"
        + (f" rolled forward to {request.at.isoformat()}" if request.at else "")
        + f"\nScope: shards {', '.join(scope.get('shards') or ['all'])}; "
        f"tables {', '.join(scope.get('tables') or ['all'])}\n"
        f"Target: {request.target_label}\n"
        f"Plan: {plan.get('objects', 0)} objects, {plan.get('rows', 0)} rows, "
        f"{plan.get('bytes', 0)} bytes; {plan.get('estimate', '')}\n"
        f"Reason: {request.reason}\n"
        f"Requested by: {request.requested_by.get_username()}\n"
    )


def approver_emails(*, exclude_user_id: int | None = None) -> list[str]:
    users = (
        get_user_model()
        .objects.filter(is_active=True)
        .filter(Q(groups__name__in=(APPROVER, ADMIN)) | Q(is_superuser=True))
        .exclude(email="")
        .distinct()
    )
    if exclude_user_id is not None:
        users = users.exclude(pk=exclude_user_id)
    return list(users.values_list("email", flat=True))


def notify_request_filed(*, request_id: int) -> None:
    """Tell every approver (except the requester) that a request awaits a decision."""
    request = RestoreRequest.objects.select_related("cluster", "requested_by").get(pk=request_id)
    _send(
        f"[ShardVault] restore {request.pk} awaits your approval ({request.target_label}, {request.cluster.name})",
        _describe(request)
        + f"\nIt needs {request.approvals_required} approval(s) from approvers other than the requester.\n",
        approver_emails(exclude_user_id=request.requested_by_id),
    )


def notify_decision(*, request_id: int, decision: str, by: int) -> None:
    """Tell the requester about each approval or the rejection."""
    request = RestoreRequest.objects.select_related("cluster", "requested_by").get(pk=request_id)
    approval = request.approvals.filter(approver_id=by).select_related("approver").first()
    who = approval.approver.get_username() if approval else "an approver"
    comment = approval.comment if approval else ""
    verb = "approved" if decision == "approve" else "rejected"
    _send(
        f"[ShardVault] restore {request.pk} {verb} by {who} (now {request.state})",
        _describe(request) + f"\n{who} {verb} it" + (f": {comment}" if comment else ".") + "\n",
        [request.requested_by.email],
    )


def notify_run_finished(*, run_id: int) -> None:
    """Tell the requester how the run ended, with its verification quality."""
    run = RestoreRun.objects.select_related(
        "request", "request__cluster", "request__requested_by"
    ).get(pk=run_id)
    request = run.request
    q = f"{run.q:.3f}" if run.q is not None else "n/a"
    _send(
        f"[ShardVault] restore {request.pk} {run.status} (Q = {q})",
        _describe(request)
        + f"\nRun {run.pk}: {run.status}. Q = {q}."
        + (f"\nError: {run.error}" if run.error else "")
        + "\n",
        [request.requested_by.email],
    )
