from django.shortcuts import render
from django.views.decorators.http import require_GET

from console.roles import role_required
from shards.models import Cluster


@require_GET
@role_required()
def cluster_list(request):
    return render(request, "shards/cluster_list.html", {"clusters": Cluster.objects.all()})
