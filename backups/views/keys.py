"""Master keys page (admins): the id of each key in use and what it still protects. Ids
only: a key itself is never shown. Rotation runs from the command line (`keys rotate`)."""

from __future__ import annotations

from django.shortcuts import render
from django.views.decorators.http import require_GET

from backups.services.keys import keys_status
from console.roles import ADMIN, role_required


@require_GET
@role_required(ADMIN)
def key_ids(request):
    return render(request, "backups/keys.html", {"status": keys_status(manifests=False)})
