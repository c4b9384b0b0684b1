from django.urls import path

from backups.views import restores

app_name = "restores"
urlpatterns = [
    path("", restores.request_list, name="request_list"),
    path("inbox/", restores.inbox, name="inbox"),
]
