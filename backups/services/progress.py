"""The one job tracker: every long job (backup, incremental, restore run, verification) reports
through it.

A JobTracker takes the engine's progress events from any thread and keeps totals in memory.
Its own thread, once a second, writes what changed to the job's row (`rows_done`,
`bytes_done`, `progress_text`: whichever the model has), publishes the same to RQ's
`job.meta`, beats the heartbeat (`heartbeat_at`, every JOB_HEARTBEAT_STALE_SECONDS / 4, so a
long lock wait or a huge chunk never looks like a dead worker), refreshes the job's
connection slots, and reads `cancel_requested`. So database writes stay about one a second
whatever the engine does, and `should_cancel()` costs nothing.

    with JobTracker(RestoreRun, run.pk) as tracker:
        engine.load_table(..., progress=tracker, should_cancel=tracker.should_cancel)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from backups.engine.types import ProgressEvent
from backups.queue import CurrentJob

log = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 1.0


@dataclass
class ProgressSnapshot:
    """What a tracker knows at one flush, handed to its `on_flush` hook."""

    rows: int
    bytes: int
    text: str
    shards: dict[str, list[int]] = field(default_factory=dict)  # shard -> [rows, bytes]
    # (shard, table) -> [rows, bytes, rows_estimate]
    tables: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    # What moved since the previous snapshot: hooks write only these rows.
    changed_shards: set[str] = field(default_factory=set)
    changed_tables: set[tuple[str, str]] = field(default_factory=set)


class JobTracker:
    """Throttled progress, heartbeat, job.meta and cancel poll for one row of `model`.

    `rows_done`/`bytes_done` start the totals (a resumed run counts what it already did).
    `on_flush(snapshot)` runs on the tracker's thread after each write, for rows of the
    job's parts (shards, tables). `slots` (anything with `refresh()`) is kept alive by the
    heartbeat; it may be set after the tracker started. `columns` limits which of the row's
    progress columns this tracker writes (a part of a fanned-out set writes its shards'
    rows through `on_flush` and leaves the set's own columns to the owner).
    """

    def __init__(
        self,
        model,
        pk: int,
        *,
        rows_done: int = 0,
        bytes_done: int = 0,
        on_flush: Callable[[ProgressSnapshot], None] | None = None,
        slots: Any = None,
        interval: float = PROGRESS_EVERY_SECONDS,
        columns: tuple[str, ...] | None = None,
    ) -> None:
        self.model = model
        self.pk = pk
        self.on_flush = on_flush
        self.slots = slots
        self.interval = interval
        self.beat_every = max(interval, settings.JOB_HEARTBEAT_STALE_SECONDS / 4)
        self.job = CurrentJob()
        names = {f.name for f in model._meta.get_fields()}
        self._columns = {
            c
            for c in ("rows_done", "bytes_done", "progress_text", "heartbeat_at")
            if c in names and (columns is None or c in columns)
        }
        self._has_cancel = "cancel_requested" in names
        self._lock = threading.Lock()
        self._rows = rows_done
        self._bytes = bytes_done
        self._text = ""
        # instance -> its pause line while a max_threads_running gate holds work back there.
        self._pauses: dict[str, str] = {}
        # "global read lock held for 12 s on 3 instances" while a cold dump holds it.
        self._lock_line = ""
        self._shards: dict[str, list[int]] = {}
        self._tables: dict[tuple[str, str], list[int]] = {}
        self._changed_shards: set[str] = set()
        self._changed_tables: set[tuple[str, str]] = set()
        self._dirty = False
        self._last_beat = 0.0
        self._last_cancel_poll = 0.0
        self._cancelled = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- from any thread

    def progress(self, event: ProgressEvent) -> None:
        """Take one engine progress event (increments, and a stage or message).

        A "throttle" event sets (or, with an empty message, clears) its instance's pause
        line, which leads the progress text for as long as the pause lasts. A "lock" event
        (a cold dump's global read lock) does the same with the lock line.
        """
        with self._lock:
            if event.stage == "lock":
                self._lock_line = event.message
                self._dirty = True
                return
            if event.stage == "throttle":
                if event.message:
                    self._pauses[event.instance] = event.message
                elif self._pauses.pop(event.instance, None) and not self._text:
                    self._text = f"resumed on instance {event.instance}"  # clears the pause line
                self._dirty = True
                return
            self._rows += max(0, event.rows_done)
            self._bytes += max(0, event.bytes_done)
            if event.shard:
                shard = self._shards.setdefault(event.shard, [0, 0])
                shard[0] += max(0, event.rows_done)
                shard[1] += max(0, event.bytes_done)
                self._changed_shards.add(event.shard)
                if event.table:
                    table = self._tables.setdefault((event.shard, event.table), [0, 0, 0])
                    table[0] += max(0, event.rows_done)
                    table[1] += max(0, event.bytes_done)
                    if event.rows_estimate:
                        table[2] = event.rows_estimate
                    self._changed_tables.add((event.shard, event.table))
            if event.message or event.stage:
                where = ".".join(p for p in (event.shard, event.table) if p)
                self._text = " ".join(
                    p for p in (event.stage, where, event.message and f"— {event.message}") if p
                )[:300]
            self._dirty = True

    __call__ = progress

    def add(self, *, rows: int = 0, nbytes: int = 0) -> None:
        """Count work done outside engine events."""
        with self._lock:
            self._rows += rows
            self._bytes += nbytes
            self._dirty = True

    def say(self, text: str, *, flush: bool = True) -> None:
        """Set the progress line; written at once unless `flush=False`."""
        with self._lock:
            self._text = text[:300]
            self._dirty = True
        if flush:
            self.flush(force=True)

    @property
    def rows_done(self) -> int:
        return self._rows

    @property
    def bytes_done(self) -> int:
        return self._bytes

    def should_cancel(self) -> bool:
        """True once someone asked to cancel the job (read at most about once a second)."""
        if self._cancelled.is_set():
            return True
        if self._thread is None and self._has_cancel:
            now = time.monotonic()
            if now - self._last_cancel_poll >= self.interval:
                self._last_cancel_poll = now
                self._poll_cancel()
        return self._cancelled.is_set()

    # ----------------------------------------------------------------- writes

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            self._dirty = False
            snapshot = ProgressSnapshot(
                rows=self._rows,
                bytes=self._bytes,
                text="; ".join(
                    p for p in (self._lock_line, *self._pauses.values(), self._text) if p
                )[:300],
                shards={k: list(v) for k, v in self._shards.items()},
                tables={k: list(v) for k, v in self._tables.items()},
                changed_shards=self._changed_shards,
                changed_tables=self._changed_tables,
            )
            self._changed_shards, self._changed_tables = set(), set()
            return snapshot

    def flush(self, *, force: bool = False) -> None:
        """Write progress if it changed (always with `force`), beat when due, poll cancel."""
        now = time.monotonic()
        values: dict[str, Any] = {}
        if force or now - self._last_beat >= self.beat_every:
            if "heartbeat_at" in self._columns:
                values["heartbeat_at"] = timezone.now()
            self._last_beat = now
            if self.slots is not None:
                try:
                    self.slots.refresh()
                except Exception:  # noqa: BLE001 - slots expire on their own if Redis is gone
                    log.debug(
                        "refreshing the connection slots of %s %s failed", self.model, self.pk
                    )
        snapshot = None
        if self._dirty or force:
            snapshot = self.snapshot()
            progress = {
                "rows_done": snapshot.rows,
                "bytes_done": snapshot.bytes,
                "progress_text": snapshot.text,
            }
            values.update(
                {
                    k: v
                    for k, v in progress.items()
                    if k in self._columns and (v or k != "progress_text")
                }
            )
        try:
            # One transaction per flush: the set's row and every shard and table row that
            # moved are one commit (one WAL sync on SQLite), not one each.
            with transaction.atomic():
                if values:
                    self.model.objects.filter(pk=self.pk).update(**values)
                if snapshot is not None and self.on_flush is not None:
                    self.on_flush(snapshot)
        except Exception:
            if snapshot is not None:
                self._unwritten(snapshot)  # the next flush writes these rows again
            raise
        if snapshot is not None:
            self.job.publish(
                {
                    "rows_done": snapshot.rows,
                    "bytes_done": snapshot.bytes,
                    "progress": snapshot.text,
                }
            )
        if self._has_cancel:
            self._last_cancel_poll = now
            self._poll_cancel()

    def _unwritten(self, snapshot: ProgressSnapshot) -> None:
        with self._lock:
            self._changed_shards |= snapshot.changed_shards
            self._changed_tables |= snapshot.changed_tables
            self._dirty = True

    def _poll_cancel(self) -> None:
        if self.model.objects.filter(pk=self.pk, cancel_requested=True).exists():
            self._cancelled.set()

    # ----------------------------------------------------------------- the tracker's thread

    def start(self) -> JobTracker:
        self._thread = threading.Thread(
            target=self._run, name=f"tracker-{self.model.__name__}-{self.pk}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread after one last write of everything counted.

        Call it before the job's finish transition, so the last write never overwrites
        the final progress line ("done", "failed") that the transition sets.
        """
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout=10)
        self._thread = None
        try:
            self.flush(force=True)
        except Exception:  # noqa: BLE001 - the job's own outcome is written by its service
            log.exception("last progress write of %s %s failed", self.model.__name__, self.pk)

    def _run(self) -> None:
        try:
            while not self._stopping.wait(self.interval):
                try:
                    self.flush()
                except Exception:  # noqa: BLE001 - a missed beat is retried next second
                    log.exception("progress of %s %s failed", self.model.__name__, self.pk)
        finally:
            connection.close()

    def __enter__(self) -> JobTracker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def worker_name() -> str:
    """`host:pid` of this process: which worker runs a part (shown per shard on the pages)."""
    return f"{socket.gethostname()}:{os.getpid()}"
