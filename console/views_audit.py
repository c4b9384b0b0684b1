"""Auditor pages: the audit log (filters, chain status, CSV export) and report downloads."""

from __future__ import annotations

import csv
import hashlib
import json

from django.core.paginator import Paginator
from django.db.models import Q
from django.http import HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from console.audit import audit_chain_head, audit_verify_chain
from console.models import AuditEvent
from console.reports import (
    CONTENT_TYPES,
    FORMATS,
    ReportError,
    parse_moment,
    report_filename,
    report_pdf,
    report_period,
    report_stream,
)
from console.roles import ADMIN, AUDITOR, role_required
from shards.models import Cluster

PAGE_SIZE = 50


def audit_events_filtered(params) -> tuple:
    """Events matching the page's filters (actor, action, object, from, to), newest first."""
    events = AuditEvent.objects.all()
    filters = {
        k: (params.get(k) or "").strip() for k in ("actor", "action", "object", "since", "until")
    }
    errors = []
    if filters["actor"]:
        events = events.filter(actor_name__iexact=filters["actor"])
    if filters["action"]:
        events = events.filter(action__istartswith=filters["action"])
    if filters["object"]:
        obj = filters["object"]
        if ":" in obj:
            kind, _, ident = obj.partition(":")
            events = events.filter(object_type__iexact=kind, object_id=ident)
        else:
            events = events.filter(
                Q(object_type__iexact=obj) | Q(object_id=obj) | Q(object_repr__icontains=obj)
            )
    for key, lookup, end in (("since", "at__gte", False), ("until", "at__lt", True)):
        if filters[key]:
            try:
                moment = parse_moment(filters[key], end=end)
            except ReportError as exc:
                errors.append(str(exc))
            else:
                events = events.filter(**{lookup: moment})
    return events.order_by("-id"), filters, errors


@require_GET
@role_required(AUDITOR, ADMIN)
def audit_log(request):
    events, filters, errors = audit_events_filtered(request.GET)
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "console/audit_log.html",
        {
            "page": page,
            "filters": filters,
            "errors": errors,
            "query": query.urlencode(),
            "chain": audit_verify_chain(),
            "actions": AuditEvent.objects.order_by().values_list("action", flat=True).distinct(),
        },
    )


class _Echo:
    def write(self, value):
        return value


@require_GET
@role_required(AUDITOR, ADMIN)
def audit_export(request):
    """The filtered audit log as CSV, streamed, oldest first, with each event's hashes."""
    events, _filters, _errors = audit_events_filtered(request.GET)
    writer = csv.writer(_Echo())
    columns = ["id", "at", "actor", "action", "object_type", "object_id", "object_repr", "details", "prev_hash", "hash"]  # fmt: skip

    def rows():
        yield writer.writerow(columns)
        for e in events.order_by("id").iterator(chunk_size=2000):
            yield writer.writerow(
                [
                    e.pk,
                    e.at.isoformat(),
                    e.actor_name,
                    e.action,
                    e.object_type,
                    e.object_id,
                    e.object_repr,
                    json.dumps(e.details, sort_keys=True),
                    e.prev_hash,
                    e.hash,
                ]  # fmt: skip
            )

    response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="shardvault-audit-log.csv"'
    return response


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
        "console/reports.html",
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
