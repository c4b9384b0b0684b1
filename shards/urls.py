from django.urls import path

from shards import views

app_name = "shards"
urlpatterns = [
    path("", views.cluster_list, name="cluster_list"),
]
