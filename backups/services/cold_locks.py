"""Cold backups' global read lock, seen from outside the worker that holds it.

A cold set holds FLUSH TABLES WITH READ LOCK on every instance for its whole dump, so every
write there waits for it. The worker releases it at once when it sees a cancel (it polls
about once a second); `cold_lock_kill` is the canceller's backstop: it KILLs the lock
connections recorded in `BackupSet.lock_sessions`, so writers go on the moment the cancel
commits, whatever the worker is doing. The lock belongs to its connection: KILL (or a
worker process dying, which closes its sockets) releases it on the server.
"""

from __future__ import annotations

import logging

from backups.engine.snapshot import lock_session_kill
from backups.models import BackupSet
from shards.models import Instance
from shards.selectors import instance_endpoint

log = logging.getLogger(__name__)


def cold_lock_sessions_record(*, set_id: int, sessions: dict[str, int]) -> None:
    """Record (or, with `{}`, clear) the connections holding a cold set's lock."""
    BackupSet.objects.filter(pk=set_id).update(lock_sessions=dict(sessions))


def cold_lock_kill(*, backup_set: BackupSet) -> list[str]:
    """KILL the connections holding `backup_set`'s global read lock; returns the instances
    where one was killed. Best effort: an instance that cannot be reached is logged."""
    fresh = BackupSet.objects.filter(pk=backup_set.pk).values_list("lock_sessions", flat=True)
    sessions = next(iter(fresh), None) or {}
    killed = []
    instances = {
        i.name: i
        for i in Instance.objects.filter(cluster_id=backup_set.cluster_id, name__in=sessions)
    }
    for name, thread_id in sorted(sessions.items()):
        instance = instances.get(name)
        if instance is None:
            continue
        try:
            if lock_session_kill(instance_endpoint(instance), int(thread_id)):
                killed.append(name)
        except Exception:  # noqa: BLE001 - the worker still releases it on its next check
            log.warning(
                "could not kill the global read lock of set %s on %s",
                backup_set.pk,
                name,
                exc_info=True,
            )
    return killed
