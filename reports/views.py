"""The dashboard (every role) and the auditor's report page and downloads."""

from __future__ import annotations

import hashlib

from django.http import HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from console.audit import audit_chain_head
from console.roles import ADMIN, AUDITOR, role_required
from reports.reports import (
    CONTENT_TYPES,
    FORMATS,
    ReportError,
    report_filename,
    report_pdf,
    report_period,
    report_stream,
)
from reports.selectors import dashboard_clusters, flagged_sets, running_jobs
from shards.models import Cluster


@require_GET
@role_required()
def dashboard(request):
    """Each cluster's health at a glance; the running-jobs table refreshes by HTMX polling."""
    if request.htmx and request.GET.get("part") == "jobs":
        # The 3-second poll: only the running-jobs table, not every cluster's health again.
        return render(request, "reports/dashboard.html#jobs", {"jobs": running_jobs()})
    context = {"clusters": dashboard_clusters(), "flagged": flagged_sets(), "jobs": running_jobs()}
    return render(request, "reports/dashboard.html", context)


@require_GET
@role_required(AUDITOR, ADMIN)
def reports(request):
    """Choose cluster, period and format; with `download=1` the report itself."""
    clusters = Cluster.objects.order_by("name")
    form = {
        "cluster": request.GET.get("cluster", ""),
        "since": request.GET.get("since", ""),
        "until": request.GET.get("until", ""),
        "format": request.GET.get("format", "pdf"),
    }
    error = ""
    if request.GET.get("download"):
        if form["format"] not in FORMATS:
            error = "Choose CSV, JSON or PDF."
        else:
            try:
                period = report_period(
                    cluster_name=form["cluster"], since=form["since"], until=form["until"]
                )
            except ReportError as exc:
                error = str(exc)[:1].upper() + str(exc)[1:] + "."
            else:
                return _download(period, form["format"])
    status = 400 if error else 200
    return render(
        request,
        "reports/reports.html",
        {"clusters": clusters, "form": form, "error": error, "formats": FORMATS},
        status=status,
    )


def _download(period, fmt: str):
    filename = report_filename(period, fmt)
    if fmt == "pdf":
        content = report_pdf(period)
        response = HttpResponse(content, content_type=CONTENT_TYPES["pdf"])
        response["X-Report-SHA256"] = hashlib.sha256(content).hexdigest()
    else:
        response = StreamingHttpResponse(
            report_stream(period, fmt), content_type=CONTENT_TYPES[fmt]
        )
    response["X-Audit-Head"] = audit_chain_head()
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
