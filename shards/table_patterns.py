"""Logical-table patterns: regular expressions that group physical tables (`t_order_[0-9]+`).

Plain Python. A pattern comes from an operator's topology file, so it is bounded: at most
MAX_PATTERN_LENGTH characters, matched only against names MySQL allows (at most 64
characters), with the `regex` engine and a timeout on every match, so a catastrophic pattern
such as `(a|aa)+$` costs a fraction of a second and one sentence, never a stuck worker or page.
"""

from __future__ import annotations

import regex

MAX_PATTERN_LENGTH = 200
MAX_TABLE_NAME_LENGTH = 64  # MySQL's limit for a table name
MATCH_TIMEOUT_SECONDS = 0.25
# Subjects a pattern is tried on when it is saved: long runs that make backtracking explode.
_PROBES = tuple(c * MAX_TABLE_NAME_LENGTH + "!" for c in ("a", "0", "_", "t", "x")) + (
    "t_order_" + "1" * 56 + "!",
)


class PatternError(Exception):
    """A pattern that cannot be used; the message is one sentence naming it."""


def pattern_refusal(pattern: str) -> str | None:
    """Why `pattern` may not be a logical-table pattern, or None: too long, not a valid regular
    expression, or so slow to match (catastrophic backtracking) that a probe times out."""
    if not isinstance(pattern, str) or not pattern:
        return "the pattern must not be empty"
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"the pattern is longer than {MAX_PATTERN_LENGTH} characters"
    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        return f"the pattern is not a valid regular expression ({exc})"
    for probe in _PROBES:
        try:
            compiled.fullmatch(probe, timeout=MATCH_TIMEOUT_SECONDS)
        except TimeoutError:
            return (
                "the pattern takes too long to match (it backtracks catastrophically, "
                "as (a|aa)+ does): simplify it, e.g. t_order_[0-9]+"
            )
    return None


def pattern_fullmatch(pattern: str, name: str) -> bool:
    """Whether table `name` is one of `pattern`'s tables; raises PatternError (one sentence)
    for a pattern that is refused or does not finish within the timeout."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"logical-table pattern {pattern[:40]!r}... is too long")
    if len(name) > MAX_TABLE_NAME_LENGTH:
        return False  # no MySQL table has such a name
    try:
        return regex.fullmatch(pattern, name, timeout=MATCH_TIMEOUT_SECONDS) is not None
    except regex.error as exc:
        raise PatternError(
            f"logical-table pattern {pattern!r} is not a valid regular expression ({exc})"
        ) from None
    except TimeoutError:
        raise PatternError(
            f"logical-table pattern {pattern!r} took too long to match {name!r}: simplify it"
        ) from None
