"""Console-level writes: users and roles, login bookkeeping."""

from __future__ import annotations

import hashlib
import unicodedata

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.cache import cache
from django.db import transaction

from console.audit import audit_record
from console.identity_audit import identity_audit_muted
from console.roles import ROLES


class UserError(Exception):
    """Bad input for a user operation; the message is one sentence."""


def user_create(
    *, username: str, role: str, email: str = "", password: str | None = None, actor=None
) -> User:
    """Create a user holding exactly one role. Refuses unknown roles and taken usernames."""
    if role not in ROLES:
        raise UserError(f"unknown role '{role}': choose one of {', '.join(ROLES)}")
    if not username or len(username) > 150:
        raise UserError("a username must have 1 to 150 characters")
    # One event naming the role, instead of the receivers' created + groups_changed pair.
    with transaction.atomic(), identity_audit_muted():
        if User.objects.filter(username=username).exists():
            raise UserError(f"user '{username}' already exists")
        user = User(username=username, email=email, is_staff=(role == "admin"))
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.save()
        # The groups come from a data migration; get_or_create keeps a flushed database usable.
        user.groups.add(Group.objects.get_or_create(name=role)[0])
        audit_record(actor=actor or "cli", action="user.create", obj=user, details={"role": role})
    return user


def login_name_normalised(username: str) -> str:
    """The name as authentication sees it (the form strips it, `UsernameField` applies NFKC),
    casefolded so that `" alice"`, `"ＡＬＩＣＥ"` and `"alice"` are one name to the throttle."""
    return unicodedata.normalize("NFKC", username.strip()).casefold()


def _throttle_keys(username: str, address: str) -> list[str]:
    # Hashed: a cache key must not carry whatever bytes somebody typed as a username.
    name = hashlib.sha256(login_name_normalised(username).encode()).hexdigest()
    return [f"login-fail:user:{name}", f"login-fail:addr:{address}"]


def login_throttled(*, username: str, address: str) -> bool:
    """True when this user or this address failed too often within the window."""
    limit = settings.LOGIN_THROTTLE_ATTEMPTS
    return any((cache.get(key) or 0) >= limit for key in _throttle_keys(username, address))


def login_failure_record(*, username: str, address: str) -> None:
    window = settings.LOGIN_THROTTLE_WINDOW
    for key in _throttle_keys(username, address):
        if cache.add(key, 1, timeout=window):
            continue
        try:
            cache.incr(key)
        except ValueError:
            cache.set(key, 1, timeout=window)
    audit_record(
        actor=username[:150] or "anonymous",
        action="login.failed",
        object_type="auth.user",
        object_repr=username[:300],
        details={"address": address},
    )


def login_success_record(*, user: User, address: str) -> None:
    audit_record(actor=user, action="login", obj=user, details={"address": address})
