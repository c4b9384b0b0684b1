"""Every error the engine and storage raise. This module imports nothing.

Each message is one sentence a person can act on; callers show it as is.
"""


class EngineError(Exception):
    """A failure the engine can name in one sentence (shown to the user as is)."""


class Cancelled(EngineError):
    """`should_cancel()` returned True; everything was released."""


class IntegrityError(EngineError):
    """A stored object does not match its recorded size or sha256, or fails to decrypt."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"object {key}: {reason}")
        self.key = key
        self.reason = reason


class ConnectError(Exception):
    """A connection could not be made; the message is one sentence for a person."""


class KeyMaterialError(Exception):
    """A master key that is malformed, or a secret it cannot open."""
