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


# What code reading a server's answer raises when the answer is odd: no row where one was
# due (None), too few or too many columns, a value of the wrong kind or encoding.
ODD_ANSWER = (TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError)


class OddAnswer(EngineError):
    """A server answered a query with something the engine cannot use (an empty result, a
    row of the wrong shape): one sentence naming the instance, the step and the table."""

    def __init__(self, instance: str, doing: str, table: str = ""):
        where = f" (table {table})" if table else ""
        super().__init__(
            f"instance {instance} gave an answer ShardVault cannot use while {doing}{where}; "
            "check that it is a MySQL or MariaDB server and that the backup user may read it"
        )
        self.instance = instance
        self.table = table


class ConnectError(Exception):
    """A connection could not be made; the message is one sentence for a person."""


class KeyMaterialError(Exception):
    """A master key that is malformed, or a secret it cannot open."""
