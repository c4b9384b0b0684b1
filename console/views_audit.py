from django.shortcuts import render
from django.views.decorators.http import require_GET

from console.audit import audit_verify_chain
from console.models import AuditEvent
from console.roles import ADMIN, AUDITOR, role_required


@require_GET
@role_required(AUDITOR, ADMIN)
def audit_log(request):
    events = AuditEvent.objects.order_by("-id")[:200]
    return render(
        request, "console/audit_log.html", {"events": events, "chain": audit_verify_chain()}
    )


@require_GET
@role_required(AUDITOR, ADMIN)
def reports(request):
    return render(request, "console/reports.html", {})
