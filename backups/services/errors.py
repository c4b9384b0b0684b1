"""The backups services' domain errors. Each message is one sentence for a person.

Pages and commands map them by type (RestoreDenied -> 403, the rest -> one clear line).
"""

from __future__ import annotations

from typing import Any


class BackupError(Exception):
    """A backup request that cannot be honoured."""


class BackupRefused(BackupError):
    """The backup could not start; it is still recorded as a `failed` set (`backup_set`)."""

    def __init__(self, message: str, backup_set: Any):
        super().__init__(message)
        self.backup_set = backup_set


class ChainError(BackupError):
    """The chain of sets cannot serve this request; the message says what to do."""


class ChainRefused(ChainError, BackupRefused):
    """An incremental that cannot start; recorded as a `failed` set saying why."""

    def __init__(self, message: str, backup_set: Any):
        BackupRefused.__init__(self, message, backup_set)


class RestoreError(Exception):
    """A restore rule or a bad input."""


class RestoreDenied(RestoreError):
    """The person may not do this (wrong role, or deciding their own request)."""


class TargetChanged(RestoreError):
    """A run's target is not the server its approval covers; nothing may touch it."""


class SwapIncomplete(RestoreError):
    """Some databases were swapped in place before another one failed (never 'untouched')."""


class VerificationError(Exception):
    """A verification cannot start or run."""
