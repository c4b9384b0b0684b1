from django.urls import path

from backups.views.metrics import metrics

urlpatterns = [path("metrics", metrics, name="metrics")]
