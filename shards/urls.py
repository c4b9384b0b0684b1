from django.urls import path

from shards import views

app_name = "shards"
urlpatterns = [
    path("", views.cluster_list, name="cluster_list"),
    path("new/", views.cluster_create_view, name="cluster_create"),
    path("import/", views.topology_import_view, name="topology_import"),
    path("export/", views.topology_export_view, name="topology_export"),
    path("clusters/<str:cluster>/", views.cluster_detail, name="cluster_detail"),
    path("clusters/<str:cluster>/edit/", views.cluster_edit, name="cluster_edit"),
    path(
        "clusters/<str:cluster>/instances/new/", views.instance_create_view, name="instance_create"
    ),
    path("clusters/<str:cluster>/instances/test/", views.instance_test, name="instance_test"),
    path(
        "clusters/<str:cluster>/instances/<str:instance>/edit/",
        views.instance_edit,
        name="instance_edit",
    ),
    path("clusters/<str:cluster>/shards/new/", views.shard_create_view, name="shard_create"),
    path("clusters/<str:cluster>/shards/test/", views.shard_test, name="shard_test"),
    path("clusters/<str:cluster>/shards/<str:shard>/edit/", views.shard_edit, name="shard_edit"),
    path("clusters/<str:cluster>/discover/", views.discovery_start, name="discovery_start"),
    path(
        "clusters/<str:cluster>/discoveries/<int:run>/",
        views.discovery_progress,
        name="discovery_progress",
    ),
]
