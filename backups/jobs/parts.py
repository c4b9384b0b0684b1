"""RQ job of one part of a job spread over workers (`backups.services.parts`): thin.

Enqueued by `parts_run` through `backups.queue` as `<owner>-part-<name>`; the handle
names the service function the part runs.
"""

from __future__ import annotations

from backups.services.parts import part_execute


def part_job(handle: dict) -> str:
    """Claim and run one part (or nothing, when the owner or another worker has it)."""
    return part_execute(handle)
