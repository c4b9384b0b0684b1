"""Cells for CSV exports that a spreadsheet opens without executing anything."""

from __future__ import annotations

from typing import Any

# A spreadsheet treats a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r", "\n")


def spreadsheet_safe(value: Any) -> Any:
    """Text that a spreadsheet would evaluate gets a leading apostrophe; numbers pass as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_LEADS):
        return "'" + value
    return value
