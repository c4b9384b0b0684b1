"""The four roles of DESIGN.md, as Django groups, and the server-side checks."""

from __future__ import annotations

from functools import wraps

from django.core.exceptions import PermissionDenied

OPERATOR = "operator"
APPROVER = "approver"
AUDITOR = "auditor"
ADMIN = "admin"
ROLES = (OPERATOR, APPROVER, AUDITOR, ADMIN)


class RoleDenied(PermissionDenied):
    """The user's role does not allow this action (a domain error, shown as 403)."""


def user_roles(user) -> set[str]:
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return set()
    cached = getattr(user, "_shardvault_roles", None)
    if cached is None:
        cached = set(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
        if user.is_superuser:
            cached.add(ADMIN)
        user._shardvault_roles = cached
    return cached


def has_role(user, *roles: str) -> bool:
    """True when the user holds any of `roles`; `admin` holds every role."""
    held = user_roles(user)
    return ADMIN in held or bool(held.intersection(roles))


def can_read(user) -> bool:
    """Every role may read; a logged-in user without a role sees nothing."""
    return bool(user_roles(user))


def require_role(user, *roles: str, action: str = "do this") -> None:
    """Raise RoleDenied unless the user holds one of `roles` (services call this)."""
    if not has_role(user, *roles):
        raise RoleDenied(f"{getattr(user, 'username', 'this user')} may not {action}")


def role_required(*roles: str):
    """View decorator: 403 unless the user holds one of `roles`.

    With no roles given, any of the four roles may enter (read-only pages).
    """

    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            allowed = has_role(request.user, *roles) if roles else can_read(request.user)
            if not allowed:
                raise PermissionDenied("your role does not allow this page")
            return view(request, *args, **kwargs)

        wrapped.required_roles = roles
        return wrapped

    return decorator
