"""RQ job for restore runs (queue `restores`, job id `restore-<run id>`): thin, idempotent.

Enqueued by `backups.services.restore_run_states.restore_run_enqueue` through `backups.queue`.
"""

from __future__ import annotations

import logging

from backups.models import RestoreRun
from backups.services.errors import RestoreError
from backups.services.restore_runs import restore_run_execute

log = logging.getLogger(__name__)


def restore_run_job(run_id: int) -> str:
    """Load the run and hand it to the executor, which re-checks the approval itself."""
    run = RestoreRun.objects.get(pk=run_id)
    try:
        run = restore_run_execute(run=run)
    except RestoreError as exc:
        log.warning("restore run %s refused: %s", run_id, exc)
        return f"refused: {exc}"
    return run.status
