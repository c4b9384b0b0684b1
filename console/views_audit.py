"""Auditor pages: the audit log (filters, chain status) and its CSV export."""

from __future__ import annotations

import csv
import json

from django.core.paginator import Paginator
from django.http import StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from console.audit import audit_verify_chain
from console.exports import spreadsheet_safe
from console.models import AuditEvent
from console.roles import ADMIN, AUDITOR, role_required
from console.selectors import audit_events_filtered

PAGE_SIZE = 50


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
                spreadsheet_safe(cell)
                for cell in [
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
