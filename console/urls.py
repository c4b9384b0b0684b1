from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from console import views

# The admin app is SimpleAdminConfig (console/settings.py): its modules load with the URLs.
admin.autodiscover()

urlpatterns = [
    path("", include("reports.urls")),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("topology/", include("shards.urls")),
    path("backups/", include("backups.urls")),
    path("restores/", include("backups.urls_restores")),
    path("", include("console.urls_audit")),
    path("", include("backups.urls_metrics")),
]
