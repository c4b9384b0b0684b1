"""Append to and verify the audit hash chain (DESIGN.md, "Audit log")."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from console.models import AuditEvent

GENESIS_HASH = "0" * 64

# The web request being served, set by console.middleware.AuditContextMiddleware. Outside a
# request (management commands, workers started by `manage.py rqworker`) every event records
# the operating-system user that ran the process (DESIGN.md, after the command list).
_current_request: ContextVar[Any] = ContextVar("audit_current_request", default=None)


@contextmanager
def audit_request_context(request) -> Iterator[None]:
    token = _current_request.set(request)
    try:
        yield
    finally:
        _current_request.reset(token)


def audit_request_user():
    """The signed-in user of the request being served, or None (no request, or anonymous)."""
    request = _current_request.get()
    user = getattr(request, "user", None)
    return user if getattr(user, "is_authenticated", False) else None


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (containers)
        return f"uid:{os.getuid()}"


def _canonical(event: AuditEvent) -> str:
    row = {
        "id": event.pk,
        "at": event.at.isoformat(),
        "actor": event.actor_name,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "object_repr": event.object_repr,
        "details": event.details,
    }
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def event_hash(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256((prev_hash + _canonical(event)).encode()).hexdigest()


# pg_advisory_xact_lock key: "SVAUDIT" as a number, one lock for the whole chain.
AUDIT_CHAIN_LOCK = 0x5356415544495400


def _chain_lock() -> None:
    """Serialise appends until the caller's transaction ends.

    Locking the head row is not enough on PostgreSQL: under READ COMMITTED a writer that
    waited for it re-checks that same row after the other commits, and both new events
    then name it as their predecessor, forking the chain. An advisory lock taken before
    the head is read makes the read see the other writer's committed event. SQLite
    serialises writers by itself (IMMEDIATE transactions).
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [AUDIT_CHAIN_LOCK])


def audit_record(
    *,
    actor: Any = None,
    action: str,
    obj: Any = None,
    object_type: str = "",
    object_id: str = "",
    object_repr: str = "",
    details: dict | None = None,
) -> AuditEvent:
    """Append one event to the chain, inside the caller's transaction.

    `actor` is a User, a username string (for system actors such as "worker"), or None.
    The chain head is locked so concurrent writers serialise.
    """
    if obj is not None:
        object_type = object_type or obj._meta.label_lower
        object_id = object_id or str(obj.pk)
        object_repr = object_repr or str(obj)[:300]
    actor_user = actor if hasattr(actor, "pk") else None
    actor_name = actor.get_username() if actor_user is not None else (actor or "system")
    details = dict(details or {})
    if _current_request.get() is None:
        details.setdefault("os_user", os_user())
    now = timezone.now()
    with transaction.atomic():
        _chain_lock()
        head = AuditEvent.objects.select_for_update().order_by("-id").first()
        prev = head.hash if head else GENESIS_HASH
        event = AuditEvent(
            at=now.replace(microsecond=(now.microsecond // 1000) * 1000),
            actor=actor_user,
            actor_name=actor_name,
            action=action,
            object_type=object_type,
            object_id=str(object_id),
            object_repr=object_repr[:300],
            details=json.loads(json.dumps(details, default=str)),
            prev_hash=prev,
            hash="pending-" + uuid.uuid4().hex,
        )
        event.save()
        event.hash = event_hash(prev, event)
        AuditEvent.objects.filter(pk=event.pk)._seal(event.hash)
    return event


@dataclass
class ChainStatus:
    intact: bool
    count: int
    head: str
    first_broken_id: int | None = None
    reason: str = ""


def audit_chain_head() -> str:
    head = AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first()
    return head or GENESIS_HASH


def audit_verify_chain() -> ChainStatus:
    """Walk the whole chain in id order (streamed) and report the first broken event."""
    prev = GENESIS_HASH
    count = 0
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        count += 1
        if event.prev_hash != prev:
            return ChainStatus(
                False, count, prev, event.pk, "its prev_hash does not match the event before it"
            )
        if event_hash(prev, event) != event.hash:
            return ChainStatus(False, count, prev, event.pk, "its contents do not match its hash")
        prev = event.hash
    return ChainStatus(True, count, prev)
