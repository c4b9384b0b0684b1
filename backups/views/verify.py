"""Verify / drill buttons and the quality fragment shown wherever a set is shown."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from backups.models import BackupSet
from backups.selectors.verification import set_quality
from backups.services.errors import VerificationError
from backups.services.verification import verification_start
from console.roles import ADMIN, OPERATOR, role_required


def _back(request, backup_set: BackupSet) -> str:
    nxt = request.POST.get("next", "")
    # Only a path on this console: `//evil.com` and `/\evil.com` are other hosts to a browser.
    if url_has_allowed_host_and_scheme(
        nxt, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ) and nxt.startswith("/"):
        return nxt
    return reverse("backups:set_detail", args=[backup_set.pk])


@require_POST
@role_required(OPERATOR, ADMIN)
def verify_start(request, set_id: int):
    backup_set = get_object_or_404(BackupSet.objects.select_related("cluster"), pk=set_id)
    drill = request.POST.get("drill") in ("1", "true", "on")
    try:
        run = verification_start(backup_set=backup_set, user=request.user, drill=drill)
    except VerificationError as exc:
        if request.htmx:
            return _quality_response(request, backup_set, error=str(exc))
        messages.error(request, str(exc))
        return redirect(_back(request, backup_set))
    if request.htmx:
        return _quality_response(request, backup_set)
    messages.success(
        request, f"{'Drill' if drill else 'Storage check'} #{run.pk} of set {backup_set.pk} queued."
    )
    return redirect(_back(request, backup_set))


@require_GET
@role_required()
def set_quality_view(request, set_id: int):
    backup_set = get_object_or_404(BackupSet.objects.select_related("cluster"), pk=set_id)
    return _quality_response(request, backup_set)


def _quality_response(request, backup_set: BackupSet, error: str = "") -> HttpResponse:
    quality = set_quality(backup_set=backup_set)
    response = render(
        request,
        "backups/_quality.html",
        {"quality": quality, "set": backup_set, "verify_error": error},
    )
    if request.htmx and quality.running is None and request.method == "GET":
        response.status_code = 286  # stop polling: nothing is running any more
    return response
