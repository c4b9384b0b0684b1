from django.urls import path

from backups.views import binlog, restores

app_name = "restores"
urlpatterns = [
    path("", restores.request_list, name="request_list"),
    path("inbox/", restores.inbox, name="inbox"),
    path("new/", restores.request_new, name="request_new"),
    path("flashback/new/", binlog.flashback_new, name="flashback_new"),
    path("<int:pk>/flashback.sql", binlog.flashback_artifact, name="flashback_artifact"),
    path("<int:pk>/", restores.request_detail, name="request_detail"),
    path("<int:pk>/approve/", restores.request_approve, name="request_approve"),
    path("<int:pk>/reject/", restores.request_reject, name="request_reject"),
    path("<int:pk>/run/", restores.run_start, name="run_start"),
    path("<int:pk>/cancel/", restores.run_cancel, name="run_cancel"),
    path("<int:pk>/progress/", restores.run_progress, name="run_progress"),
]
