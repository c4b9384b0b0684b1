"""Read-side queries of the console: the audit log's filters."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Q, QuerySet

from console.models import AuditEvent


class MomentError(ValueError):
    """A value that is not a date or a moment; the message is one sentence."""


def parse_moment(value: str, *, end: bool) -> datetime:
    """A date (YYYY-MM-DD: its start, or with `end` the start of the next day) or an ISO 8601
    moment; naive values are UTC. Raises MomentError with one sentence."""
    value = value.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day, time.min, tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MomentError(f"'{value}' is not a date (use YYYY-MM-DD or ISO 8601)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def audit_events_filtered(params) -> tuple[QuerySet[AuditEvent], dict[str, str], list[str]]:
    """Events matching the page's filters (actor, action, object, from, to), newest first."""
    events = AuditEvent.objects.all()
    filters = {
        k: (params.get(k) or "").strip() for k in ("actor", "action", "object", "since", "until")
    }
    errors = []
    if filters["actor"]:
        events = events.filter(actor_name__iexact=filters["actor"])
    if filters["action"]:
        events = events.filter(action__istartswith=filters["action"])
    if filters["object"]:
        obj = filters["object"]
        if ":" in obj:
            kind, _, ident = obj.partition(":")
            events = events.filter(object_type__iexact=kind, object_id=ident)
        else:
            events = events.filter(
                Q(object_type__iexact=obj) | Q(object_id=obj) | Q(object_repr__icontains=obj)
            )
    for key, lookup, end in (("since", "at__gte", False), ("until", "at__lt", True)):
        if filters[key]:
            try:
                moment = parse_moment(filters[key], end=end)
            except MomentError as exc:
                errors.append(str(exc))
            else:
                events = events.filter(**{lookup: moment})
    return events.order_by("-id"), filters, errors
