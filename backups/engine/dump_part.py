"""One part of a fanned-out full backup: the shards of one instance, dumped by whichever
worker runs the part, at a cut the owner of the set coordinates.

Entry point: `dump_part(spec, storage, *, cut, progress, should_cancel) -> PartDump`.

`spec.shards` are the part's shards only. The part connects, describes its tables and
opens its dump connections exactly as `dump_cluster` does, then:

* `locked` / `cold`: takes part in the owner's two-phase cut (`barrier.PartCut`): it
  reports ready, opens its snapshots when the owner (holding the global read lock on
  every instance) says go, reports them open with its binlog coordinates, and dumps once
  the owner confirms the cut. It never takes the lock itself (a cold set's owner holds it
  until every part finished).
* `lockfree`: its own snapshot per shard, no barrier.

Chunks and schema files are written exactly as `dump_cluster` writes them, under the same
set prefix; the manifest is not: the part returns its shards' manifest entries
(`manifest.manifest_shard_entry`) for the owner to write one manifest. A part that fails
or is cancelled deletes what it stored (its shards' prefixes) after its dump threads have
stopped, so nothing of it can appear after that.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime

import pymysql

from backups.engine.barrier import OwnerCut, PartCut
from backups.engine.dump import COLD_LOCK_SESSION_TIMEOUT, COLD_LOCK_WATCH, _close, _DumpRun
from backups.engine.errors import ODD_ANSWER, Cancelled, ConnectError, EngineError, OddAnswer
from backups.engine.manifest import manifest_shard_entry
from backups.engine.mysql import connect
from backups.engine.snapshot import (
    Coordinates,
    GlobalLock,
    gtid_at,
    master_status,
    now_utc,
    start_snapshot,
)
from backups.engine.types import BackupSpec, CancelFn, ProgressEvent, ProgressFn
from backups.storage.base import key_part


@dataclass
class PartDump:
    """What a part hands back to the owner (JSON-able through `as_dict`)."""

    ok: bool
    shards: list[dict] = field(default_factory=list)  # manifest shard entries, spec order
    error: str = ""
    shard_errors: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)  # "database.table"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "shards": self.shards,
            "error": self.error,
            "shard_errors": self.shard_errors,
            "excluded": self.excluded,
            "notes": self.notes,
        }


def dump_part(
    spec: BackupSpec,
    storage,
    *,
    cut: PartCut | None,
    progress: ProgressFn,
    should_cancel: CancelFn,
) -> PartDump:
    """Dump the shards of `spec` (one part of a set) at the owner's cut; see the module
    docstring. `cut` is required for `locked` and `cold`. Raises Cancelled when
    `should_cancel()` turns true (after removing what it stored)."""
    if spec.consistency in ("locked", "cold") and cut is None:
        raise ValueError("a locked or cold part needs the owner's cut")
    return _PartRun(spec, storage, progress, should_cancel, cut).run()


class _PartRun(_DumpRun):
    def __init__(self, spec, storage, progress, should_cancel, cut: PartCut | None):
        super().__init__(spec, storage, progress, should_cancel)
        self.part_cut = cut
        self.cut_taken = False

    def run(self) -> PartDump:
        try:
            self._check_cancel()
            if not self._preflight():
                return self._failed()
            self._check_cancel()
            self._open_connections()
            if self.spec.consistency in ("locked", "cold"):
                self._snapshot_at_owners_cut()
            else:
                self._snapshot_lockfree()
            self._run_workers()
            if self.cancelled:
                raise Cancelled("backup cancelled")
            if self.first_error:
                return self._failed()
            return self._succeeded()
        except Cancelled:
            self._tell_owner("cancelled")
            self._teardown(None)
            self._discard_objects()
            raise
        except OddAnswer as exc:
            self._record_instance_error(exc.instance, str(exc))
            return self._failed()
        except EngineError as exc:
            self._record_error(None, str(exc))
            return self._failed()
        except BaseException as exc:
            self._tell_owner(f"{exc.__class__.__name__}: {exc}")
            raise
        finally:
            self._teardown(None)

    def _tell_owner(self, reason: str) -> None:
        if self.part_cut is not None and not self.cut_taken:
            self.part_cut.fail(reason)

    # ---------------------------------------------------------------- the cut
    def _snapshot_at_owners_cut(self) -> None:
        self._progress(ProgressEvent(stage="locking", message="waiting for the cut"))
        current = ""

        def open_snapshot() -> dict:
            nonlocal current
            for group in self.groups:
                current = group.instance
                for conn in group.connections:
                    start_snapshot(conn)
            # Read under the owner's lock: no commit can move these until it is released.
            return {
                group.instance: list(master_status(self.controls[group.instance]))
                for group in self.groups
            }

        def rollback() -> None:
            for group in self.groups:
                for conn in group.connections:
                    conn.rollback()

        try:
            opened, at = self.part_cut.take(
                open_snapshot=open_snapshot, rollback=rollback, should_stop=self.should_cancel
            )
        except Cancelled:
            self.cancelled = True
            raise
        except pymysql.err.MySQLError as exc:
            raise EngineError(f"starting the consistent snapshot failed: {exc.args[-1]}") from exc
        except ODD_ANSWER as exc:
            raise OddAnswer(current, "taking the consistent snapshot") from exc
        self.cut_taken = True
        consistent_at = datetime.fromisoformat(at) if at else now_utc()
        self.cut.consistent_at = consistent_at
        for group in self.groups:
            file, pos, mysql_gtid = opened[group.instance]
            try:
                gtid = gtid_at(self.controls[group.instance], file, pos, mysql_gtid)
            except ODD_ANSWER as exc:
                raise OddAnswer(group.instance, "reading the snapshot's GTID position") from exc
            group.coordinates = Coordinates(file, pos, gtid, consistent_at)
            for shard in group.shards:
                self.cut.coordinates[shard.name] = group.coordinates
        self._progress(ProgressEvent(stage="snapshot", message="snapshot open at the cut"))

    # ---------------------------------------------------------------- results
    def _discard_objects(self) -> None:
        """Only this part's shards: the other parts' objects are theirs (and a failed
        set's whole prefix goes with the set's failure transition)."""
        for shard in self.spec.shards:
            try:
                self.storage.delete_prefix(f"{self.spec.set_prefix}/{key_part(shard.name)}/")
            except Exception:  # noqa: BLE001 - best effort; the sweep removes leftovers
                pass

    def _failed(self) -> PartDump:
        self._tell_owner(self.first_error or "the part failed")
        self._teardown(None)  # every dump thread has stopped before anything is deleted
        result = self._result(ok=False)  # deletes this part's objects
        return PartDump(
            ok=False,
            error=result.error,
            shard_errors=dict(self.shard_errors),
            excluded=result.excluded,
            notes=list(self.notes),
        )

    def _succeeded(self) -> PartDump:
        result = self._result(ok=True)
        entries = [
            manifest_shard_entry(
                shard=shard,
                shard_result=shard_result,
                tables=self.tables[shard.name],
                objects=self.objects.get(shard.name, {}),
                coordinates=self.cut.coordinates.get(shard.name, Coordinates()),
                excluded=self.excluded.get(shard.name, []),
            )
            for shard, shard_result in zip(self.spec.shards, result.shards, strict=True)
        ]
        return PartDump(ok=True, shards=entries, excluded=result.excluded, notes=list(self.notes))


# ---------------------------------------------------------------------------- the owner


class OwnerCutThread(threading.Thread):
    """The owner's half of a fanned-out `locked`/`cold` cut, on a thread of its own (the
    owner's main thread waits for the parts meanwhile).

    Connects once per instance (the lock connections), runs `barrier.OwnerCut.take` with a
    `GlobalLock` over them, and for `cold` holds the lock, pinging it once a second and
    saying how long it has held it (a "lock" progress event with the lock's sessions),
    until `stop()`. Everything is released when the thread ends, whatever happened;
    `failure` holds the exception that ended the cut early, `lost` is set when a cold lock
    connection was lost mid-dump. `progress` must be safe from any thread.
    """

    def __init__(
        self,
        spec: BackupSpec,
        redis,
        key,
        parts: list[str],
        *,
        ready_timeout: float,
        progress: ProgressFn,
        should_stop: CancelFn,
        on_failure=lambda exc: None,
    ) -> None:
        super().__init__(daemon=True, name=f"cut-{spec.set_id}")
        self.spec = spec
        self.cold = spec.consistency == "cold"
        self.owner_cut = OwnerCut(redis, key, parts)
        self.ready_timeout = ready_timeout
        self.progress = progress
        self.should_stop = should_stop
        self.on_failure = on_failure
        self.endpoints = {}
        for shard in spec.shards:
            self.endpoints.setdefault(shard.instance, shard.endpoint)
        self.controls: dict[str, object] = {}
        self.lock = GlobalLock(
            self.controls,
            self.endpoints,
            wait_timeout=spec.lock_wait_timeout,
            retries=spec.lock_retries,
            should_cancel=self._stopping,
            session_timeout=COLD_LOCK_SESSION_TIMEOUT if self.cold else 0,
        )
        self.taken = threading.Event()
        self.done = threading.Event()
        self._stopped = threading.Event()
        self.failure: BaseException | None = None
        self.lost: list[str] = []
        self.lock_window_ms: float | None = None

    def _stopping(self) -> bool:
        return self._stopped.is_set() or self.should_stop()

    def stop(self) -> None:
        """Release the lock now (cancel, a part failed, or the dump ended) and end."""
        self._stopped.set()

    @property
    def consistent_at(self) -> datetime | None:
        return self.owner_cut.consistent_at

    @property
    def coordinates(self) -> dict[str, dict]:
        return self.owner_cut.coordinates

    def run(self) -> None:
        try:
            for instance, endpoint in self.endpoints.items():
                try:
                    self.controls[instance] = connect(endpoint)
                except ConnectError as exc:
                    raise EngineError(f"instance {instance} unreachable: {exc}") from exc
            self._emit("locking", "waiting for every part to be ready for the cut")
            self.owner_cut.take(
                lock_acquire=self.lock.acquire,
                lock_release=self.lock.release,
                ready_timeout=self.ready_timeout,
                open_timeout=float(self.spec.lock_wait_timeout),
                retries=self.spec.lock_retries,
                should_stop=self._stopping,
                hold=self.cold,
                now=now_utc,
            )
            self.taken.set()
            if self.cold:
                self._hold()
            else:
                self.lock_window_ms = self.lock.window_ms
                self._emit("snapshot", f"lock window {self.lock_window_ms} ms")
        except BaseException as exc:  # noqa: BLE001 - handed to the owner
            if not isinstance(exc, Cancelled):
                self.failure = exc
                self.on_failure(exc)
        finally:
            self._release()
            for conn in self.controls.values():
                _close(conn)
            self.controls.clear()
            self.done.set()

    def _hold(self) -> None:
        """Cold: keep the lock until `stop()`, pinged and reported once a second."""
        while not self._stopped.wait(COLD_LOCK_WATCH) and not self.should_stop():
            lost = self.lock.keepalive()
            if lost:
                self.lost = sorted(lost)
                raise EngineError(
                    "the global read lock of this cold backup was lost on "
                    f"{', '.join(self.lost)} (its connection was closed or killed) mid-dump"
                )
            count = len(self.lock.locked)
            self._progress(
                ProgressEvent(
                    stage="lock",
                    message=f"global read lock held for {int(self.lock.held_seconds)} s on "
                    f"{count} instance{'s' if count != 1 else ''} (writes blocked until the "
                    "dump ends)",
                    lock_sessions=self.lock.sessions(),
                )
            )

    def _release(self) -> None:
        held = bool(self.lock.locked)
        self.lock.release()
        if self.cold and self.taken.is_set():
            self.lock_window_ms = self.lock.window_ms
        if held and self.cold:
            self._progress(ProgressEvent(stage="lock", message="", lock_sessions={}))
            self._emit("snapshot", f"global read lock released after {self.lock_window_ms} ms")

    def _emit(self, stage: str, message: str) -> None:
        self._progress(ProgressEvent(stage=stage, message=message))

    def _progress(self, event: ProgressEvent) -> None:
        try:
            self.progress(event)
        except Exception:  # noqa: BLE001 - a progress sink must never break the cut
            pass
