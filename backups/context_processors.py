from backups.selectors import restore_requests_awaiting_count
from console.roles import APPROVER, has_role


def restore_inbox(request):
    """The navigation's badge: restore requests awaiting this approver's decision."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    if not has_role(user, APPROVER):
        return {"awaiting_approval_count": 0}
    return {"awaiting_approval_count": restore_requests_awaiting_count(user=user)}
