"""Storage targets page (admins): every target sets can be copied to, and a form to add one."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from backups.forms_storage import StorageTargetForm
from backups.services.storage_targets import (
    StorageTargetError,
    storage_target_add,
    storage_targets_list,
)
from console.roles import ADMIN, role_required


@require_http_methods(["GET", "POST"])
@role_required(ADMIN)
def storage_targets(request):
    form = StorageTargetForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            target = storage_target_add(
                name=data["name"],
                url=data["url"],
                endpoint=data["endpoint"],
                options=form.options(),
                user=request.user,
            )
        except StorageTargetError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Storage target {target.name} added.")
            return redirect("backups:storage_targets")
    return render(
        request,
        "backups/storage_targets.html",
        {"targets": storage_targets_list(), "form": form},
    )
