"""Read-side queries for backups, restores and verification."""

from backups.models import RestoreRequest


def restore_requests_awaiting_count(*, user) -> int:
    """Requests this user could still approve (not their own, not yet decided by them)."""
    return (
        RestoreRequest.objects.filter(state=RestoreRequest.State.PENDING_APPROVAL)
        .exclude(requested_by=user)
        .exclude(approvals__approver=user)
        .count()
    )
