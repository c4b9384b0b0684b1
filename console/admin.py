from django.contrib import admin

from console.models import AuditEvent
from console.roles import ADMIN, has_role
from console.views import admin_login


def _admin_only(request) -> bool:
    return request.user.is_active and has_role(request.user, ADMIN)


# The Django admin is for the `admin` role only (DESIGN.md, "Who uses it").
admin.site.has_permission = _admin_only
admin.site.site_header = "ShardVault administration"
# Admin accounts sign in through the console's throttled, audited login, never Django's own.
admin.site.login = admin_login


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("id", "at", "actor_name", "action", "object_type", "object_id")
    list_filter = ("action", "object_type")
    search_fields = ("actor_name", "object_repr", "object_id")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
