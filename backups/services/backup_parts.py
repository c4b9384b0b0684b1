"""One part of a fanned-out full set: every shard of one instance, dumped on whichever
worker claimed it, at the owner's cut (DESIGN.md "Scale-out"; the owner is
`services/fanout.py`).

`backup_part_run` takes the instance's connection slots under the part's own holder,
writes its shards' worker and progress rows (`SetPartRows`, which the single-process path
uses too), answers the owner's barrier, stops within about a second of a cancel, of the
set ending, of the owner aborting or dying, and hands its shards' manifest entries back.
"""

from __future__ import annotations

import time

from backups.engine.barrier import PartCut
from backups.engine.dump_part import dump_part
from backups.engine.errors import Cancelled, EngineError
from backups.models import BackupSet, ShardBackup, TableBackup
from backups.services.backup_spec import (
    PreflightRefused,
    backup_connection_slots,
    backup_spec_build,
)
from backups.services.connection_slots import SlotsUnavailable
from backups.services.parts import PartContext
from backups.services.progress import JobTracker, ProgressSnapshot
from backups.services.sets import set_job_id, set_storage
from backups.status import PartStatus, SetStatus

# How long a part waits for free connection slots on its instance before failing.
PART_SLOT_WAIT_SECONDS = 15 * 60


def part_slot_holder(set_id: int, instance: str) -> str:
    """Who holds a part's connection slots (the part's job id)."""
    return f"{set_job_id(set_id)}-part-{instance}"


def backup_part_run(ctx: PartContext, set_id: int, instance_name: str) -> dict:
    """One part (every shard of one instance) of a running fanned-out set, on whichever
    worker claimed it; returns `PartDump.as_dict()` for the owner.

    Refused (EngineError) when the set is no longer running. Takes the instance's
    connection slots, writes its shards' worker and progress, stops within about a second
    of a cancel, of the set ending, of the owner aborting or dying; on any failure its own
    objects are removed and its shards carry the reason.
    """
    backup_set = BackupSet.objects.select_related("cluster").get(pk=set_id)
    if backup_set.status != SetStatus.RUNNING or backup_set.cancel_requested:
        raise EngineError(f"set {set_id} is {backup_set.status}; its part is not needed")
    shard_backups = list(
        backup_set.shard_backups.select_related("shard__instance")
        .filter(instance_name=instance_name)
        .order_by("shard_name")
    )
    if not shard_backups:
        raise EngineError(f"set {set_id} has no shard on instance {instance_name}")
    ShardBackup.objects.filter(pk__in=[sb.pk for sb in shard_backups]).update(
        worker=ctx.worker[:255], status=PartStatus.RUNNING
    )
    cut = None
    if backup_set.consistency in (BackupSet.Consistency.LOCKED, BackupSet.Consistency.COLD):
        cut = PartCut(ctx.redis, ctx.key, instance_name)
    slots = backup_connection_slots(
        backup_set=backup_set,
        shard_backups=shard_backups,
        holder=part_slot_holder(set_id, instance_name),
    )
    # A part's progress line (a throttle pause, the table it dumps) becomes the set's; not
    # while a cold set's owner says each second how long it has held the lock.
    cold = backup_set.consistency == BackupSet.Consistency.COLD
    tracker = JobTracker(
        BackupSet,
        set_id,
        on_flush=SetPartRows(backup_set, set_estimate=False),
        slots=slots,
        columns=() if cold else ("progress_text",),
    )
    ended = _SetEnded(set_id)

    def should_stop() -> bool:
        return tracker.should_cancel() or ctx.aborted() or ended()

    tracker.start()
    try:
        try:
            if slots is not None:
                slots.acquire(wait=PART_SLOT_WAIT_SECONDS, should_cancel=should_stop)
            if should_stop():
                raise Cancelled("backup cancelled")
            spec = backup_spec_build(
                backup_set=backup_set, shard_backups=shard_backups, slots=slots
            )
        except (SlotsUnavailable, PreflightRefused, EngineError) as exc:
            message = getattr(exc, "message", "") or str(exc)
            _shard_errors(shard_backups, getattr(exc, "shard_errors", {}))
            if cut is not None:
                cut.fail(message)
            raise EngineError(message) from None
        except Cancelled:
            if cut is not None:
                cut.fail("cancelled")
            raise
        part = dump_part(
            spec,
            set_storage(backup_set),
            cut=cut,
            progress=tracker.progress,
            should_cancel=should_stop,
        )
    finally:
        tracker.stop()
        if slots is not None:
            slots.release()
    if not part.ok:
        _shard_errors(shard_backups, part.shard_errors)
        raise EngineError(part.error or "the part failed")
    return part.as_dict()


def _shard_errors(shard_backups, errors: dict[str, str]) -> None:
    for sb in shard_backups:
        if errors.get(sb.shard_name):
            ShardBackup.objects.filter(pk=sb.pk).update(error=errors[sb.shard_name][:2000])


class _SetEnded:
    """True once the set is no longer running (failed, reaped, cancelled): read at most
    once a second, so a part of a failed set stops writing into its deleted prefix."""

    def __init__(self, set_id: int) -> None:
        self.set_id = set_id
        self.checked = 0.0
        self.ended = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.ended and now - self.checked >= 1.0:
            self.checked = now
            status = (
                BackupSet.objects.filter(pk=self.set_id).values_list("status", flat=True).first()
            )
            self.ended = status != SetStatus.RUNNING
        return self.ended


class SetPartRows:
    """A tracker's `on_flush`: each shard's and table's progress onto its own row, and the
    engine's row estimate onto the set when it exceeds the discovery's."""

    def __init__(self, backup_set: BackupSet, *, set_estimate: bool = True) -> None:
        self.set_id = backup_set.pk
        self.set_estimate = set_estimate  # a part sees only its shards: the owner sums them
        self.discovery_estimate = backup_set.rows_estimate
        self.table_ids: dict[tuple[str, str], int] = {}
        parts = ShardBackup.objects.filter(backup_set_id=self.set_id)
        self.shard_ids = dict(parts.values_list("shard_name", "id"))
        self.databases = dict(parts.values_list("shard_name", "database"))

    def __call__(self, snapshot: ProgressSnapshot) -> None:
        # Only the rows that moved since the last flush: a finished table is not rewritten
        # every second while the rest of a large cluster is dumped.
        for shard_name in snapshot.changed_shards:
            rows, nbytes = snapshot.shards[shard_name]
            ShardBackup.objects.filter(pk=self.shard_ids.get(shard_name)).update(
                rows_done=rows, bytes_done=nbytes, status=PartStatus.RUNNING
            )
        for key in snapshot.changed_tables:
            rows, nbytes, estimate = snapshot.tables[key]
            self._table(*key, rows, nbytes, estimate)
        engine_estimate = sum(t[2] for t in snapshot.tables.values())
        if self.set_estimate and engine_estimate > self.discovery_estimate:
            BackupSet.objects.filter(pk=self.set_id).update(rows_estimate=engine_estimate)
            self.discovery_estimate = engine_estimate  # written again only when it grows

    def _table(self, shard_name, table, rows, nbytes, estimate) -> None:
        shard_backup_id = self.shard_ids.get(shard_name)
        if shard_backup_id is None:
            return
        table_id = self.table_ids.get((shard_name, table))
        values = {"rows": rows, "raw_bytes": nbytes}
        if estimate:
            values["rows_estimate"] = estimate
        if table_id is None:
            obj, _ = TableBackup.objects.update_or_create(
                shard_backup_id=shard_backup_id,
                name=table,
                defaults={
                    **values,
                    "database": self.databases.get(shard_name, ""),
                    "status": PartStatus.RUNNING,
                },
            )
            self.table_ids[(shard_name, table)] = obj.pk
        else:
            TableBackup.objects.filter(pk=table_id).update(**values)
