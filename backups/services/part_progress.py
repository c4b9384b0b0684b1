"""Progress and slots of the parts of a job (`backups.services.parts`) for the job's tracker.

A part that runs on another worker cannot write the owner's JobTracker: its PartTracker
counts rows and bytes per shard and table and puts them in Redis about once a second;
the owner's PartProgressRelay reads them and feeds them to its tracker as progress
events, so the job's totals and per-shard figures include every part. A part the owner
runs itself (`ctx.local`) reports straight to the owner's tracker.

    # part side
    tracker = PartTracker(ctx, owner_tracker_if_local)
    tracker.start(); ...; tracker.stop()
    # owner side
    relay = PartProgressRelay(tracker, [p.name for p in parts])
    parts_run(..., on_start=relay.start); relay.stop()
"""

from __future__ import annotations

import json
import logging
import threading
import time

from django.conf import settings

from backups.engine.types import ProgressEvent
from backups.services.parts import PartContext
from backups.services.progress import JobTracker

log = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 1.0


class PartTracker:
    """The tracker of one part: the owner's JobTracker when the owner runs the part itself
    (`owner`), else counters per shard and table that go to Redis about once a second
    (the owner's PartProgressRelay adds them to its tracker). Keeps the part's
    connection slots (`slots`, anything with `refresh()`) alive; `should_cancel()` is the
    owner's abort (and the owner's own cancel poll when it runs the part)."""

    def __init__(self, ctx: PartContext, owner: JobTracker | None = None) -> None:
        self.ctx = ctx
        self.owner = owner
        self.slots = None
        self._lock = threading.Lock()
        # "shard\ttable" -> [rows, bytes, rows_estimate], what this part did so far
        self._tables: dict[str, list[int]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="part tracker")

    def progress(self, event) -> None:
        if self.owner is not None:
            self.owner.progress(event)
        elif event.stage not in ("lock", "throttle") and (event.rows_done or event.bytes_done):
            with self._lock:
                figures = self._tables.setdefault(f"{event.shard}\t{event.table}", [0, 0, 0])
                figures[0] += max(0, event.rows_done)
                figures[1] += max(0, event.bytes_done)
                figures[2] = event.rows_estimate or figures[2]

    __call__ = progress

    def say(self, text: str, *, flush: bool = True) -> None:
        if self.owner is not None:
            self.owner.say(text, flush=flush)

    def should_cancel(self) -> bool:
        if self.owner is not None and self.owner.should_cancel():
            return True
        return self.ctx.aborted()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._publish()

    def _publish(self) -> None:
        if self.owner is not None:
            return
        with self._lock:
            figures = json.dumps(self._tables)
        try:
            self.ctx.redis.set(self.ctx.key("progress", self.ctx.name), figures, ex=24 * 3600)
        except Exception:  # noqa: BLE001 - progress figures never fail a restore
            log.debug("restore part %s could not publish its progress", self.ctx.name)

    def _run(self) -> None:
        beat_every = max(PROGRESS_EVERY_SECONDS, settings.JOB_HEARTBEAT_STALE_SECONDS / 4)
        last_beat = 0.0
        while not self._stopping.wait(PROGRESS_EVERY_SECONDS):
            self._publish()
            now = time.monotonic()
            if self.slots is not None and now - last_beat >= beat_every:
                last_beat = now
                try:
                    self.slots.refresh()
                except Exception:  # noqa: BLE001 - they expire on their own if Redis is gone
                    log.debug("restore part %s could not refresh its slots", self.ctx.name)


class PartProgressRelay:
    """The owner's side of `PartTracker`: adds what the parts on other workers did to the
    run's tracker about once a second, per shard and table (so the run page's live
    figures show their shards too)."""

    def __init__(self, tracker: JobTracker, parts: list[str]) -> None:
        self.tracker = tracker
        self.parts = parts
        self.handle = None
        self.seen: dict[tuple[str, str], list[int]] = {}  # (part, "shard\ttable") -> figures
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress relay")

    def start(self, handle) -> None:
        self.handle = handle
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.handle is not None:
            self._thread.join(timeout=5)
            self._read()

    def _read(self) -> None:
        keys = [self.handle.key("progress", name) for name in self.parts]
        try:
            values = self.handle.redis.mget(keys)
        except Exception:  # noqa: BLE001 - progress figures never fail a restore
            return
        for name, value in zip(self.parts, values, strict=True):
            if value is None:
                continue
            for where, (rows, nbytes, estimate) in json.loads(value).items():
                before = self.seen.get((name, where), [0, 0, 0])
                if (rows, nbytes) == tuple(before[:2]):
                    continue
                self.seen[(name, where)] = [rows, nbytes, estimate]
                shard, table = where.split("\t", 1)
                # As the part's engine events would have been: per shard and table.
                self.tracker.progress(
                    ProgressEvent(
                        shard=shard,
                        table=table,
                        rows_done=rows - before[0],
                        bytes_done=nbytes - before[1],
                        rows_estimate=estimate,
                    )
                )

    def _run(self) -> None:
        while not self._stopping.wait(PROGRESS_EVERY_SECONDS):
            self._read()
