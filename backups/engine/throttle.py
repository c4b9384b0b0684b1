"""Load on production: hold new chunks while a server is busy (policy `max_threads_running`).

Plain Python (no Django). One `ThreadsRunningGate` per instance per run, shared by every
thread of the run that works on that instance. Before a thread starts a new chunk (a dump
SELECT, a restore LOAD DATA, a binlog segment a restore applies) it calls `gate.wait(...)`;
a chunk already running is never interrupted, so the pause lands between chunks. A paused
dump keeps its snapshot open (InnoDB keeps undo history for it, as for any long snapshot).

How busy the server is: `SHOW GLOBAL STATUS LIKE 'Threads_running'`, read on the gate's own
lightweight connection at most once per `poll_interval` whatever the number of threads
(the reading is shared). The run's own work is not counted against the limit: the poll
itself is one running thread, and each of the run's connections inside a chunk on that
instance (counted by `gate.chunk()`) may be another, so the gate compares

    others = Threads_running - 1 - (the run's connections inside a chunk)

with the limit. That can undercount by the run's connections that sit between two
statements of a chunk, never overcount; while the run is paused none of its connections
is inside a chunk, so the reading that ends a pause is exactly everyone else's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from backups.engine.mysql import Endpoint, connect
from backups.engine.types import ProgressEvent

POLL_INTERVAL = 0.5
STAGE = "throttle"


def paused_text(value: int, limit: int, instance: str) -> str:
    return f"paused: Threads_running {value} > {limit} on instance {instance}"


class ThreadsRunningGate:
    """Lets new chunks start on `instance` only while its other running threads <= `limit`."""

    def __init__(
        self,
        *,
        instance: str,
        endpoint: Endpoint,
        limit: int,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.instance = instance
        self.endpoint = endpoint
        self.limit = int(limit)
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._conn = None
        self._active = 0
        self._read_at = 0.0
        self._value: int | None = None
        self._reported = ""  # the pause line last reported ("" = running)
        self.pauses = 0  # how many times the gate held work back (for results and tests)

    # ------------------------------------------------------------------ accounting
    @contextmanager
    def chunk(self):
        """Count one of the run's connections as running on the instance for the block."""
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def others_running(self) -> int | None:
        """Threads running on the instance that are not this run's (None: cannot tell)."""
        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._read_at >= self.poll_interval:
                self._value = self._poll()
                self._read_at = now
            if self._value is None:
                return None
            return max(0, self._value - 1 - self._active)

    def _poll(self) -> int | None:
        try:
            if self._conn is None:
                self._conn = connect(
                    self.endpoint, connect_timeout=5, read_timeout=10, autocommit=True
                )
            with self._conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_running'")
                row = cur.fetchone()
            return int(row[1]) if row else None
        except Exception:  # noqa: BLE001 - a broken monitor never stalls the run; retried
            self._close()
            return None

    # ------------------------------------------------------------------ the gate
    def wait(self, *, stopped: Callable[[], bool], report: Callable[[ProgressEvent], None]) -> bool:
        """Return True when a new chunk may start, False when `stopped()` turned true first.

        While the instance is busier than the limit, reports the pause line once (and again
        when the reading changes) through `report`, and an empty line when work resumes.
        """
        while True:
            if stopped():
                return False
            others = self.others_running()
            busy = others is not None and others > self.limit
            self._report(paused_text(others, self.limit, self.instance) if busy else "", report)
            if not busy:
                return True
            deadline = time.monotonic() + self.poll_interval
            while time.monotonic() < deadline:
                if stopped():
                    return False
                time.sleep(min(0.1, self.poll_interval))

    def _report(self, text: str, report: Callable[[ProgressEvent], None]) -> None:
        with self._lock:
            if text == self._reported:
                return
            if text and not self._reported:
                self.pauses += 1
            self._reported = text
            try:  # under the lock, so a pause and its end are reported in order
                report(ProgressEvent(stage=STAGE, instance=self.instance, message=text))
            except Exception:  # noqa: BLE001 - a progress sink must never break the run
                pass

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None
