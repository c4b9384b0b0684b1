from console.roles import ADMIN, APPROVER, AUDITOR, OPERATOR, has_role, user_roles


def navigation(request):
    """Role flags for the navigation (the server still checks every view)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    context = {
        "roles": sorted(user_roles(user)),
        "is_operator": has_role(user, OPERATOR),
        "is_approver": has_role(user, APPROVER),
        "is_auditor": has_role(user, AUDITOR),
        "is_admin": has_role(user, ADMIN),
    }
    return context
