"""Read-side queries for the console pages."""

from shards.models import Cluster


def dashboard_clusters():
    return Cluster.objects.order_by("name")
