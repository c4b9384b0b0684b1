"""Every change to users, groups and permissions becomes an audit event, whatever made it.

Roles are groups (console.roles), so a role granted in the Django admin, a password reset
from `changepassword`, a reactivated account or a permission added in a shell would
otherwise leave no trace in the hash chain. These receivers are the one place that sees all
of those paths; services that record a richer event of their own (`user_create`) mute them
with `identity_audit_muted()`.

Never recorded: password hashes (only that the password changed) and `last_login` (the
login itself is audited by the login view).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from django.contrib.auth.models import Group, Permission, User
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save

from console.audit import audit_record, audit_request_user

USER_FIELDS = (
    "username",
    "email",
    "first_name",
    "last_name",
    "is_active",
    "is_staff",
    "is_superuser",
)

_muted: ContextVar[bool] = ContextVar("identity_audit_muted", default=False)


@contextmanager
def identity_audit_muted() -> Iterator[None]:
    """For a service that audits the identity change it makes itself."""
    token = _muted.set(True)
    try:
        yield
    finally:
        _muted.reset(token)


def _actor():
    return audit_request_user() or "system"


def _user_before(sender, instance: User, update_fields=None, raw=False, **kwargs) -> None:
    if raw or instance.pk is None or _muted.get():
        return
    if update_fields is not None and set(update_fields) <= {"last_login"}:
        return
    instance._audit_before = (
        User.objects.filter(pk=instance.pk).values(*USER_FIELDS, "password").first()
    )


def _user_saved(sender, instance: User, created: bool, raw=False, **kwargs) -> None:
    if raw or _muted.get():
        return
    if created:
        audit_record(
            actor=_actor(),
            action="user.created",
            obj=instance,
            details={f: getattr(instance, f) for f in USER_FIELDS if f != "username"}
            | {"password_set": instance.has_usable_password()},
        )
        return
    before = instance.__dict__.pop("_audit_before", None)
    if before is None:
        return
    changes = {
        f: [before[f], getattr(instance, f)]
        for f in USER_FIELDS
        if before[f] != getattr(instance, f)
    }
    if before["password"] != instance.password:
        audit_record(
            actor=_actor(),
            action="user.password_changed",
            obj=instance,
            details={"usable": instance.has_usable_password()},
        )
    if "is_active" in changes:
        action = "user.reactivated" if instance.is_active else "user.deactivated"
        audit_record(actor=_actor(), action=action, obj=instance)
        del changes["is_active"]
    if changes:
        audit_record(
            actor=_actor(), action="user.changed", obj=instance, details={"changes": changes}
        )


def _user_deleted(sender, instance: User, **kwargs) -> None:
    if not _muted.get():
        audit_record(actor=_actor(), action="user.deleted", obj=instance)


def _group_saved(sender, instance: Group, created: bool, raw=False, **kwargs) -> None:
    if not raw and not _muted.get():
        action = "group.created" if created else "group.changed"
        audit_record(actor=_actor(), action=action, obj=instance)


def _group_deleted(sender, instance: Group, **kwargs) -> None:
    if not _muted.get():
        audit_record(actor=_actor(), action="group.deleted", obj=instance)


def _names(model, pks) -> list[str]:
    if model is Permission:
        rows = model.objects.filter(pk__in=pks).select_related("content_type")
        return sorted(f"{p.content_type.app_label}.{p.codename}" for p in rows)
    return sorted(str(o) for o in model.objects.filter(pk__in=pks))


def _membership_receiver(owner_model, member_model, action_name: str):
    """A receiver for one many-to-many relation (`owner.<members>`), from either side."""

    def receiver(sender, instance, action, reverse, model, pk_set, **kwargs) -> None:
        if _muted.get():
            return
        if action == "pre_clear":
            # The rows are gone by post_clear: name them now.
            if reverse:
                owners = list(owner_model.objects.filter(**{_relation[sender]: instance}))
                instance._audit_cleared = [(o, [instance.pk]) for o in owners]
            else:
                related = getattr(instance, _relation[sender]).values_list("pk", flat=True)
                instance._audit_cleared = [(instance, list(related))]
            return
        if action == "post_clear":
            pairs = instance.__dict__.pop("_audit_cleared", [])
            verb = "removed"
        elif action in ("post_add", "post_remove") and pk_set:
            verb = "added" if action == "post_add" else "removed"
            if reverse:
                pairs = [(o, [instance.pk]) for o in owner_model.objects.filter(pk__in=pk_set)]
            else:
                pairs = [(instance, list(pk_set))]
        else:
            return
        for owner, member_pks in pairs:
            if member_pks:
                audit_record(
                    actor=_actor(),
                    action=action_name,
                    obj=owner,
                    details={verb: _names(member_model, member_pks)},
                )

    return receiver


# The relation's name on its owner: an attribute forward, a lookup from the other side.
_relation = {
    User.groups.through: "groups",
    User.user_permissions.through: "user_permissions",
    Group.permissions.through: "permissions",
}


def connect() -> None:
    """Called once from ConsoleConfig.ready()."""
    uid = "console.identity_audit"
    pre_save.connect(_user_before, sender=User, dispatch_uid=f"{uid}.user_before")
    post_save.connect(_user_saved, sender=User, dispatch_uid=f"{uid}.user_saved")
    post_delete.connect(_user_deleted, sender=User, dispatch_uid=f"{uid}.user_deleted")
    post_save.connect(_group_saved, sender=Group, dispatch_uid=f"{uid}.group_saved")
    post_delete.connect(_group_deleted, sender=Group, dispatch_uid=f"{uid}.group_deleted")
    for through, owner, member, action in (
        (User.groups.through, User, Group, "user.groups_changed"),
        (User.user_permissions.through, User, Permission, "user.permissions_changed"),
        (Group.permissions.through, Group, Permission, "group.permissions_changed"),
    ):
        m2m_changed.connect(
            _membership_receiver(owner, member, action),
            sender=through,
            weak=False,  # the receiver is a closure: nothing else keeps it alive
            dispatch_uid=f"{uid}.{action}",
        )
