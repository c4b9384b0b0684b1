from django.urls import path

from console import views_audit

urlpatterns = [
    path("audit/", views_audit.audit_log, name="audit_log"),
    path("audit/export.csv", views_audit.audit_export, name="audit_export"),
]
