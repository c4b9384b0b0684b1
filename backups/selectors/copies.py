"""Read-side queries for a set's copies on storage targets and the quality of each copy."""

from __future__ import annotations

from backups.models import BackupSet, SetCopy, VerificationRun
from backups.status import VerificationStatus

DEFAULT_TARGET = "default"


def set_copies(backup_set: BackupSet) -> list[SetCopy]:
    """The set's copies, in the order they were started."""
    return list(SetCopy.objects.filter(backup_set=backup_set).order_by("id"))


def set_copies_json(backup_set: BackupSet) -> list[dict]:
    """`backups show --json`'s "copies": [{"target", "state"}], one per copy_to target."""
    return [{"target": c.target, "state": c.state} for c in set_copies(backup_set)]


def set_target_quality(backup_set: BackupSet) -> list[dict]:
    """A and Q per storage target: the newest finished `verify --target` run of each target
    holding the set (default first, then its copies); None where a target was never checked.

    [{"target", "state", "a", "q", "drill", "verified_at", "problems"}]
    """
    copies = set_copies(backup_set)
    rows = [{"target": DEFAULT_TARGET, "state": "complete"}] + [
        {"target": c.target, "state": c.state} for c in copies
    ]
    latest: dict[str, VerificationRun] = {}
    runs = (
        VerificationRun.objects.filter(backup_set=backup_set, status=VerificationStatus.SUCCEEDED)
        .exclude(target="")
        .order_by("-finished_at", "-id")
    )
    for run in runs:
        latest.setdefault(run.target, run)
    for row in rows:
        run = latest.get(row["target"])
        row.update(
            {
                "a": run.a if run else None,
                "q": run.q if run else None,
                "drill": run.drill if run else None,
                "verified_at": run.finished_at if run else None,
                "problems": len(run.problems or []) if run else 0,
            }
        )
    return rows
