from django.shortcuts import render
from django.views.decorators.http import require_GET

from backups.models import BackupSet
from console.roles import role_required


@require_GET
@role_required()
def set_list(request):
    return render(request, "backups/set_list.html", {"sets": BackupSet.objects.all()[:100]})
