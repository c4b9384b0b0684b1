"""Restore pages: list, inbox, wizard, detail with sign-off, run progress (thin views)."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseStopPolling

from backups.forms_restores import RestoreRequestForm
from backups.models import RestoreRequest
from backups.selectors.incrementals import RecoveryPoint, recoverable_window
from backups.selectors.live import run_shard_rows
from backups.selectors.restores import (
    restore_request_approvals,
    restore_request_get,
    restore_request_latest_run,
    restore_request_list,
    restore_request_timeline,
    restore_requests_awaiting,
)
from backups.services.errors import RestoreDenied, RestoreError
from backups.services.rebuild_plan import rebuild_plan_build, rebuild_source_resolve
from backups.services.restore_plan import restore_plan_build
from backups.services.restore_requests import (
    parse_target,
    restore_request_approve,
    restore_request_decision_allowed,
    restore_request_file,
    restore_request_reject,
    restore_source_resolve,
    restore_stop_resolve,
)
from backups.services.restore_run_states import restore_run_cancel, restore_run_start
from backups.status import RequestState, RunStatus
from console.roles import APPROVER, OPERATOR, has_role, role_required
from shards.models import Cluster


def _get_request(pk: int) -> RestoreRequest:
    try:
        return restore_request_get(pk=pk)
    except RestoreRequest.DoesNotExist as exc:
        raise Http404("no such restore request") from exc


@require_GET
@role_required()
def request_list(request):
    return render(
        request,
        "backups/restore_list.html",
        {"requests": restore_request_list(), "title": "Restores", "inbox": False},
    )


@require_GET
@role_required(APPROVER)
def inbox(request):
    return render(
        request,
        "backups/restore_list.html",
        {
            "requests": restore_requests_awaiting(user=request.user),
            "title": "Awaiting my approval",
            "inbox": True,
        },
    )


@require_http_methods(["GET", "POST"])
@role_required(OPERATOR)
def request_new(request):
    """The wizard: cluster, then set or time, scope and target, then the plan, then a reason."""
    source = request.POST if request.method == "POST" else request.GET
    cluster = Cluster.objects.filter(name=source.get("cluster", "")).first()
    context = {"clusters": Cluster.objects.all(), "cluster": cluster, "plan": None, "error": ""}
    if cluster is None:
        return render(request, "backups/restore_new.html", context)
    context["point"] = RecoveryPoint(cluster, *recoverable_window(cluster))
    bound = "preview" in source or request.method == "POST"
    # Prefilled from links (the Transactions page: ?cluster=..&before_gtid=..&tables=..).
    initial = {"cluster": cluster.name}
    for name in ("before_gtid", "until", "tables", "at"):
        if source.get(name):
            initial[name] = source.get(name)
    form = RestoreRequestForm(source if bound else None, cluster=cluster, initial=initial)
    context["form"] = form
    if not bound or not form.is_valid():
        return render(request, "backups/restore_new.html", context)
    data = form.cleaned_data
    try:
        if request.method == "POST":
            filed = restore_request_file(
                cluster=cluster,
                requester=request.user,
                source_set=data["source_set"],
                at=data["at"],
                shards=data["shards"],
                tables=data["table_names"],
                target=data["target"],
                reason=data["reason"],
                before_gtid=data["before_gtid"],
                until=data["until_positions"],
                datadir=data["datadir"],
            )
            messages.success(
                request, f"Restore request {filed.pk} filed; approvers have been told."
            )
            return redirect("restores:request_detail", pk=filed.pk)
        kind, instance = parse_target(cluster=cluster, target=data["target"])
        source_set, at, stop_positions = data["source_set"], data["at"], []
        if kind == RestoreRequest.Target.REBUILD:
            context["plan"] = rebuild_plan_build(
                cluster=cluster,
                source_set=rebuild_source_resolve(cluster=cluster, source_set=source_set, at=at),
                instance=instance,
                datadir=data["datadir"],
                at=at,
                shards=data["shards"],
                tables=data["table_names"],
            )
            return render(request, "backups/restore_new.html", context)
        if data["before_gtid"] or data["until_positions"]:
            source_set, at, stop_positions = restore_stop_resolve(
                cluster=cluster, before_gtid=data["before_gtid"], until=data["until_positions"]
            )
        elif source_set is None:
            source_set = restore_source_resolve(cluster=cluster, source_set=None, at=at)
        context["plan"] = restore_plan_build(
            cluster=cluster,
            source_set=source_set,
            at=at,
            before_gtid=data["before_gtid"],
            stop_positions=stop_positions,
            shards=data["shards"],
            tables=data["table_names"],
            target_kind=kind,
            target_instance=instance,
        )
    except RestoreError as exc:
        context["error"] = str(exc)
        return render(request, "backups/restore_new.html", context, status=400)
    return render(request, "backups/restore_new.html", context)


def _detail_context(request, restore: RestoreRequest, error: str = "") -> dict:
    run = restore_request_latest_run(request=restore)
    user = request.user
    can_decide = restore_request_decision_allowed(request=restore, user=user)
    run_active = run is not None and RunStatus.is_active(run.status)
    return {
        "restore": restore,
        "plan": restore.plan,
        "approvals": restore_request_approvals(request=restore),
        "timeline": restore_request_timeline(request=restore),
        "run": run,
        "results": run.results.all() if run else [],
        "shard_rows": run_shard_rows(run),
        "run_active": run_active,
        "can_decide": can_decide,
        "is_requester": restore.requested_by_id == user.pk,
        "can_run": restore.state == RequestState.APPROVED and has_role(user, OPERATOR),
        "can_cancel": run_active and has_role(user, OPERATOR),
        "error": error,
    }


@require_GET
@role_required()
def request_detail(request, pk: int):
    restore = _get_request(pk)
    return render(request, "backups/restore_detail.html", _detail_context(request, restore))


def _act(request, pk: int, action) -> object:
    restore = _get_request(pk)
    try:
        action(restore)
    except RestoreError as exc:
        restore.refresh_from_db()
        return render(
            request,
            "backups/restore_detail.html",
            _detail_context(request, restore, error=str(exc)),
            status=403 if isinstance(exc, RestoreDenied) else 409,
        )
    return redirect("restores:request_detail", pk=restore.pk)


def _decide(request, pk: int, decide, verb: str):
    def act(restore):
        decide(request=restore, approver=request.user, comment=request.POST.get("comment", ""))
        messages.success(request, f"You {verb} restore {restore.pk}.")

    return _act(request, pk, act)


@require_POST
@role_required()
def request_approve(request, pk: int):
    # No role decorator beyond "signed in with a role": the service refuses the requester
    # first and non-approvers second, with the same sentences the command prints.
    return _decide(request, pk, restore_request_approve, "approved")


@require_POST
@role_required()
def request_reject(request, pk: int):
    return _decide(request, pk, restore_request_reject, "rejected")


@require_POST
@role_required(OPERATOR)
def run_start(request, pk: int):
    def start(restore):
        run = restore_run_start(request=restore, actor=request.user)
        messages.success(request, f"Restore run {run.pk} queued.")

    return _act(request, pk, start)


@require_POST
@role_required(OPERATOR)
def run_cancel(request, pk: int):
    def cancel(restore):
        run = restore_request_latest_run(request=restore)
        if run is None:
            raise RestoreError(f"restore {restore.pk} has no run to cancel")
        restore_run_cancel(run=run, actor=request.user)
        messages.success(request, f"Cancellation of run {run.pk} requested.")

    return _act(request, pk, cancel)


@require_GET
@role_required()
def run_progress(request, pk: int):
    """The run's live progress; polling stops (286) once the run has ended."""
    restore = _get_request(pk)
    context = _detail_context(request, restore)
    if not request.htmx:
        return render(request, "backups/restore_detail.html", context)
    response = render(request, "backups/_restore_progress.html", context)
    run = context["run"]
    if run is None or RunStatus.is_final(run.status):
        stop = HttpResponseStopPolling()
        stop.content = response.content
        # Once, at the end: reload so the state, the timeline and the buttons are final too.
        stop["HX-Refresh"] = "true"
        return stop
    return response
