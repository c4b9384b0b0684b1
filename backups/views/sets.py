"""Backup set pages: list (with "Back up now"), detail, live progress, cancel."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseStopPolling

from backups.forms import COLD_WARNING, BackupFilterForm, BackupStartForm
from backups.models import BackupSet
from backups.selectors.backups import (
    backup_set_detail,
    backup_set_list,
    long_snapshot_shards,
    progress_of,
    set_non_innodb_tables,
    set_physical_objects,
)
from backups.selectors.copies import set_copies, set_target_quality
from backups.selectors.incrementals import RecoveryPoint, cluster_chains, recoverable_window
from backups.selectors.live import set_shard_rows
from backups.services.errors import BackupError, BackupRefused
from backups.services.full_backups import backup_cancel, backup_start
from backups.services.holds import backup_set_hold, backup_set_release
from backups.services.retention import retention_notes
from console.roles import ADMIN, OPERATOR, has_role, role_required


@require_GET
@role_required()
def set_list(request):
    filters = BackupFilterForm(request.GET or None)
    criteria = filters.cleaned_data if filters.is_valid() else {}
    sets = list(
        backup_set_list(
            cluster=criteria.get("cluster"),
            kind=criteria.get("kind", ""),
            status=criteria.get("status", ""),
        )
    )
    notes = retention_notes(sets=sets)  # a few queries for the whole page, not one per set
    for backup_set in sets:
        backup_set.live = progress_of(backup_set) if backup_set.is_active else None
        backup_set.retention = notes.get(backup_set.pk)
    can_run = has_role(request.user, OPERATOR, ADMIN)
    initial = {}
    if criteria.get("cluster"):
        initial["cluster"] = criteria["cluster"]
    context = {
        "sets": sets,
        "filters": filters,
        "start_form": BackupStartForm(initial=initial) if can_run else None,
        "cold_warning": COLD_WARNING,
        "can_run": can_run,
    }
    if criteria.get("cluster"):
        cluster = criteria["cluster"]
        context["chains"] = cluster_chains(cluster)
        context["point"] = RecoveryPoint(cluster, *recoverable_window(cluster))
    return render(request, "backups/set_list.html", context)


@require_POST
@role_required(OPERATOR, ADMIN)
def set_start(request):
    form = BackupStartForm(request.POST)
    if not form.is_valid():
        errors = "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())
        messages.error(request, f"The backup was not started: {errors}")
        return redirect("backups:set_list")
    data = form.cleaned_data
    try:
        backup_set = backup_start(
            cluster=data["cluster"],
            actor=request.user,
            kind=data["kind"],
            consistency=data["consistency"],
            method=data["method"],
            compression_level=data["compression_level"],
            encrypt=data["encrypt"],
        )
    except BackupRefused as exc:
        messages.error(request, f"{exc}.")
        return redirect("backups:set_detail", pk=exc.backup_set.pk)
    except BackupError as exc:
        messages.error(request, f"The backup was not started: {exc}.")
        return redirect("backups:set_list")
    messages.success(request, f"Backup set {backup_set.pk} of {data['cluster'].name} queued.")
    return redirect("backups:set_detail", pk=backup_set.pk)


def _get_set(pk: int) -> BackupSet:
    try:
        return backup_set_detail(set_id=pk)
    except BackupSet.DoesNotExist:
        raise Http404("no such backup set") from None


@require_GET
@role_required()
def set_detail(request, pk: int):
    backup_set = _get_set(pk)
    shard_backups = list(backup_set.shard_backups.all())
    for sb in shard_backups:
        sb.live = progress_of(sb, started_at=sb.started_at, active=backup_set.is_active)
    context = {
        "set": backup_set,
        "shard_backups": shard_backups,
        "progress": progress_of(backup_set),
        "long_snapshots": long_snapshot_shards(backup_set),
        "can_run": has_role(request.user, OPERATOR, ADMIN),
        "retention": retention_notes(sets=[backup_set]).get(backup_set.pk),
        "can_release": has_role(request.user, ADMIN),
        "copies": set_copies(backup_set),
        "target_quality": set_target_quality(backup_set),
        "shard_rows": set_shard_rows(backup_set),
        "non_innodb": set_non_innodb_tables(shard_backups),
        "physical_objects": set_physical_objects(backup_set),
    }
    return render(request, "backups/set_detail.html", context)


@require_GET
@role_required()
def set_shards(request, pk: int):
    """The set page's live shard table (rows, bytes, current tables, worker), one HTMX poll
    for every shard; 286 (stop polling) once the set ended, with the final figures.

    Without HTMX (a plain link), it sends the reader to the set's page.
    """
    if not request.htmx:
        return redirect("backups:set_detail", pk=pk)
    backup_set = BackupSet.objects.filter(pk=pk).first()
    if backup_set is None:
        raise Http404("no such backup set")
    context = {"set": backup_set, "shard_rows": set_shard_rows(backup_set)}
    response = render(request, "backups/_set_shards.html", context)
    if backup_set.is_active:
        return response
    return HttpResponseStopPolling(response.content)


@require_GET
@role_required()
def set_progress(request, pk: int):
    """The `_set_progress` fragment, polled by HTMX; 286 (stop polling) once the set ended.

    Without HTMX (a plain link), it sends the reader to the set's page.
    """
    if not request.htmx:
        return redirect("backups:set_detail", pk=pk)
    backup_set = BackupSet.objects.select_related("cluster").filter(pk=pk).first()
    if backup_set is None:
        raise Http404("no such backup set")
    compact = request.GET.get("compact") == "1"
    context = {
        "set": backup_set,
        "progress": progress_of(backup_set),
        "compact": compact,
        "can_run": has_role(request.user, OPERATOR, ADMIN),
    }
    response = render(request, "backups/_set_progress.html", context)
    if backup_set.is_active:
        return response
    stopped = HttpResponseStopPolling(response.content)
    # The set ended: reload once so the per-shard and per-table figures are final too.
    stopped["HX-Refresh"] = "true"
    return stopped


@require_POST
@role_required(OPERATOR, ADMIN)
def set_cancel(request, pk: int):
    backup_set = BackupSet.objects.filter(pk=pk).first()
    if backup_set is None:
        raise Http404("no such backup set")
    try:
        backup_set = backup_cancel(backup_set=backup_set, actor=request.user)
    except BackupError as exc:
        messages.error(request, f"Not cancelled: {exc}.")
    else:
        if backup_set.status == BackupSet.Status.CANCELLED:
            messages.success(request, f"Backup set {pk} cancelled.")
        else:
            messages.success(request, f"Cancelling backup set {pk}; it stops within seconds.")
    return redirect(reverse("backups:set_detail", kwargs={"pk": pk}))


@require_POST
@role_required(OPERATOR, ADMIN)
def set_hold(request, pk: int):
    """Put a set on hold (operators, admins): retention keeps it and its chain."""
    backup_set = BackupSet.objects.filter(pk=pk).first()
    if backup_set is None:
        raise Http404("no such backup set")
    try:
        backup_set_hold(
            backup_set=backup_set, actor=request.user, reason=request.POST.get("reason", "")
        )
    except BackupError as exc:
        messages.error(request, f"Not put on hold: {exc}.")
    else:
        messages.success(request, f"Backup set {pk} is on hold; retention keeps it.")
    return redirect(reverse("backups:set_detail", kwargs={"pk": pk}))


@require_POST
@role_required(ADMIN)
def set_release(request, pk: int):
    """Lift a set's hold (admins only)."""
    backup_set = BackupSet.objects.filter(pk=pk).first()
    if backup_set is None:
        raise Http404("no such backup set")
    try:
        backup_set_release(
            backup_set=backup_set, actor=request.user, reason=request.POST.get("reason", "")
        )
    except BackupError as exc:
        messages.error(request, f"Not released: {exc}.")
    else:
        messages.success(request, f"Backup set {pk} released; retention decides about it again.")
    return redirect(reverse("backups:set_detail", kwargs={"pk": pk}))
