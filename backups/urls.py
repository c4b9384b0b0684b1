from django.urls import path

from backups.views import sets

app_name = "backups"
urlpatterns = [
    path("", sets.set_list, name="set_list"),
]
