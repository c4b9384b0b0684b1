from django.shortcuts import render
from django.views.decorators.http import require_GET

from backups.models import RestoreRequest
from console.roles import APPROVER, role_required


@require_GET
@role_required()
def request_list(request):
    return render(
        request, "backups/restore_list.html", {"requests": RestoreRequest.objects.all()[:100]}
    )


@require_GET
@role_required(APPROVER)
def inbox(request):
    return render(
        request,
        "backups/restore_list.html",
        {"requests": RestoreRequest.objects.filter(state="pending_approval")},
    )
