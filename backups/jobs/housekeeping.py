"""The periodic job (queue `default`): runs one entry of `backups.queue.PERIODIC`, re-arms it."""

from __future__ import annotations

from django.db import close_old_connections
from django.utils.module_loading import import_string

from backups import queue


def periodic_job(name: str):
    """Run the periodic entry `name`, then arm its next run (also when this one failed)."""
    close_old_connections()
    periodic = queue.PERIODIC.get(name)
    if periodic is None:
        return f"unknown periodic job {name!r}"
    try:
        return import_string(periodic.path)()
    finally:
        queue.periodic_ensure_scheduled((name,))
