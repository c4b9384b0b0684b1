"""Backup policies (DESIGN.md "Policies, schedules and retention"): one per cluster.

* `policy_get_or_create(*, cluster)`: the cluster's policy, created with the defaults.
* `policy_changes_clean(changes)`: parse and check values given as text (CLI, form, YAML)
  or Python values; raises PolicyInvalid, one sentence naming the first bad field.
* `policy_changes_errors(changes)`: every bad field with its sentence (for the form).
* `policy_update(*, cluster, actor, changes)`: apply checked changes, one audit event with
  the old and new values (none when nothing changed), re-arm the schedules after commit.
* `copy_to` names must be storage targets (`storage_targets.storage_target_names()`).
"""

from __future__ import annotations

import logging
from typing import Any

from croniter import croniter
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction

from backups.models import BackupPolicy
from backups.services.errors import BackupError
from backups.services.storage_targets import storage_target_names
from console.audit import audit_record
from console.roles import ADMIN, require_role
from shards.models import Cluster

log = logging.getLogger(__name__)

CONSISTENCIES = ("locked", "lockfree", "cold")
METHODS = ("logical", "physical")

# Every field a person may edit, in the order of `policy show --json`.
POLICY_FIELDS = (
    "full_cron",
    "full_consistency",
    "incremental_every_minutes",
    "keep_full",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_days",
    "copy_to",
    "full_method",
    "exclude_tables",
    "max_threads_running",
    "encrypt",
    "compression_level",
    "rpo_target_minutes",
    "drill_every_days",
    "webhook_url",
)
_COUNTS = {
    "incremental_every_minutes",
    "keep_full",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_days",
    "max_threads_running",
    "rpo_target_minutes",
    "drill_every_days",
}
_CLEARS = {"", "none"}


class PolicyInvalid(BackupError):
    """A policy value that cannot be used; `field` names it, the message is one sentence."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def cron_is_valid(expression: str) -> bool:
    """A standard five-field cron expression that croniter can run."""
    return len(expression.split()) == 5 and croniter.is_valid(expression)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _count(field: str, value: Any) -> int:
    if isinstance(value, bool):
        raise PolicyInvalid(field, f"{field} must be a whole number, not {value!r}")
    text = _text(value)
    try:
        number = int(text)
    except ValueError:
        raise PolicyInvalid(
            field, f"{field} must be a whole number of 0 or more, not '{text}'"
        ) from None
    if number < 0:
        raise PolicyInvalid(field, f"{field} must be 0 or more, not {number}")
    return number


def _names(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        items = [_text(v) for v in value]
    else:
        text = _text(value)
        items = [] if text.lower() in _CLEARS else [p.strip() for p in text.split(",")]
    return [i for i in items if i]


def _bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise PolicyInvalid(field, f"{field} must be on or off, not '{text}'")


def _clean_field(field: str, value: Any) -> Any:
    if field == "full_cron":
        text = _text(value)
        if text.lower() in _CLEARS:
            return ""
        if not cron_is_valid(text):
            raise PolicyInvalid(
                field,
                f"full_cron '{text}' is not a valid cron expression: use five fields "
                "(minute hour day-of-month month day-of-week), e.g. '0 2 * * *'",
            )
        return " ".join(text.split())
    if field == "full_consistency":
        text = _text(value).lower()
        if text not in CONSISTENCIES:
            raise PolicyInvalid(
                field, f"full_consistency '{text}' is unknown: choose {', '.join(CONSISTENCIES)}"
            )
        return text
    if field == "full_method":
        text = _text(value).lower()
        if text not in METHODS:
            raise PolicyInvalid(
                field, f"full_method '{text}' is unknown: choose logical or physical"
            )
        return text
    if field in _COUNTS:
        return _count(field, value)
    if field == "compression_level":
        number = _count(field, value)
        if not 1 <= number <= 22:
            raise PolicyInvalid(field, f"compression_level must be between 1 and 22, not {number}")
        return number
    if field == "copy_to":
        names = _names(value)
        known = storage_target_names()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PolicyInvalid(
                field,
                f"copy_to names an unknown storage target '{unknown[0]}' "
                f"(known: {', '.join(sorted(known))})",
            )
        return list(dict.fromkeys(names))
    if field == "exclude_tables":
        globs = _names(value)
        for glob in globs:
            database, dot, table = glob.partition(".")
            if not dot or not database or not table or any(c.isspace() for c in glob):
                raise PolicyInvalid(
                    field,
                    f"exclude_tables pattern '{glob}' must be database.table "
                    "(globs allowed, e.g. 'scratch.*' or '*.tmp_*')",
                )
        return list(dict.fromkeys(globs))
    if field == "encrypt":
        return _bool(field, value)
    if field == "webhook_url":
        text = _text(value)
        if text.lower() in _CLEARS:
            return ""
        try:
            URLValidator(schemes=["http", "https"])(text)
        except ValidationError:
            raise PolicyInvalid(
                field, f"webhook_url '{text}' is not an http or https URL"
            ) from None
        return text
    raise PolicyInvalid(
        field, f"'{field}' is not a policy field (known: {', '.join(POLICY_FIELDS)})"
    )


def policy_changes_clean(changes: dict[str, Any]) -> dict[str, Any]:
    """The checked values of `changes`; PolicyInvalid (one sentence) on the first bad field."""
    return {field: _clean_field(field, value) for field, value in changes.items()}


def policy_changes_errors(changes: dict[str, Any]) -> dict[str, str]:
    """Every bad field of `changes` with its sentence (empty when all are good)."""
    errors = {}
    for field, value in changes.items():
        try:
            _clean_field(field, value)
        except PolicyInvalid as exc:
            errors[field] = str(exc)
    return errors


def policy_get_or_create(*, cluster: Cluster) -> BackupPolicy:
    """The cluster's policy; created with DESIGN.md's defaults the first time it is asked for."""
    policy, _created = BackupPolicy.objects.get_or_create(cluster=cluster)
    return policy


def policy_values(policy: BackupPolicy) -> dict[str, Any]:
    """Every editable field's current value (lists copied)."""
    return {
        f: list(getattr(policy, f)) if f in ("copy_to", "exclude_tables") else getattr(policy, f)
        for f in POLICY_FIELDS
    }


def policy_update(
    *, cluster: Cluster, actor, changes: dict[str, Any], source: str = ""
) -> tuple[BackupPolicy, dict[str, Any]]:
    """Apply `changes` to the cluster's policy; returns (policy, {field: [old, new]}).

    Refuses (PolicyInvalid, nothing saved) any bad value. Only admins may change a policy
    (a plain string actor is a system actor: the CLI or the topology file import). Fields
    whose value does not change are ignored; when nothing changes nothing is saved or
    audited. Schedules are re-armed after the commit.
    """
    clean = policy_changes_clean(changes)
    with transaction.atomic():
        policy, _created = BackupPolicy.objects.select_for_update().get_or_create(cluster=cluster)
        old = policy_values(policy)
        diff = {f: [old[f], v] for f, v in clean.items() if old[f] != v}
        if not diff:
            return policy, {}
        if hasattr(actor, "pk"):
            require_role(actor, ADMIN, action="change backup policies")
        for field, (_old, new) in diff.items():
            setattr(policy, field, new)
        policy.save()
        audit_record(
            actor=actor,
            action="policy.update",
            obj=policy,
            details={
                "cluster": cluster.name,
                "old": {f: pair[0] for f, pair in diff.items()},
                "new": {f: pair[1] for f, pair in diff.items()},
                **({"source": source} if source else {}),
            },
        )
        cluster_id = cluster.pk
        transaction.on_commit(lambda: _arm_quietly(cluster_id))
    return policy, diff


def _arm_quietly(cluster_id: int) -> None:
    # Imported here: schedules start backups, which read policies.
    from backups import queue
    from backups.services.schedules import schedules_arm

    try:
        schedules_arm(cluster_ids=[cluster_id])
        queue.periodic_ensure_scheduled()  # the minute re-arming and the hourly drills
    except Exception as exc:  # noqa: BLE001 - the periodic "schedules" job arms it within a minute
        # One line, no traceback: `policy set` must not print one when Redis is down.
        log.warning("the schedules of cluster %s could not be armed now (%s)", cluster_id, exc)
