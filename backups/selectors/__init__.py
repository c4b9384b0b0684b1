"""Read-side queries: one module per area (backups, restores, verification)."""

from backups.selectors.restores import restore_requests_awaiting_count

__all__ = ["restore_requests_awaiting_count"]
