"""The two-phase cut of a fanned-out set (engine/barrier.py) over a real Redis: a part that
does not open its snapshot in time fails the round (the lock is released and the cut
retried, the other parts roll their snapshots back), and after the last retry the cut
fails naming the part, with the lock released and every part told."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from backups.engine.barrier import CutFailed, OwnerCut, PartCut
from backups.engine.snapshot import now_utc


class LockState:
    """Stands in for the owner's GlobalLock: records when it is held."""

    def __init__(self) -> None:
        self.held = False
        self.acquired = 0

    def acquire(self) -> None:
        assert not self.held
        self.held = True
        self.acquired += 1

    def release(self) -> None:
        self.held = False


def run_part(conn, key, name, *, late_rounds: int, results: dict, lock: LockState):
    """A part whose snapshot opens `late_rounds` times too late (never, when -1)."""
    opened = []
    rolled_back = []

    def open_snapshot():
        assert lock.held, "a snapshot opened outside the owner's lock"
        if late_rounds < 0 or len(opened) < late_rounds:
            opened.append("late")
            time.sleep(0.8)
        else:
            opened.append("in time")
        return {"file": f"bin-{name}", "pos": len(opened)}

    try:
        results[name] = PartCut(conn, key, name).take(
            open_snapshot=open_snapshot,
            rollback=lambda: rolled_back.append(True),
            should_stop=lambda: False,
        )
    except CutFailed as exc:
        results[name] = exc
    results[f"{name}-rollbacks"] = len(rolled_back)


@pytest.fixture
def cut_keys(redis_url):
    conn = redis.Redis.from_url(redis_url)
    prefix = f"test-cut:{uuid.uuid4().hex[:8]}:"
    yield conn, (lambda *suffix: prefix + ":".join(suffix))
    for name in conn.scan_iter(prefix + "*"):
        conn.delete(name)


def take_cut(conn, key, lock: LockState, *, late_rounds: int, retries: int):
    results: dict = {}
    parts = [
        threading.Thread(
            target=run_part,
            args=(conn, key, name),
            kwargs={"late_rounds": late, "results": results, "lock": lock},
        )
        for name, late in (("m1", 0), ("m2", late_rounds))
    ]
    for thread in parts:
        thread.start()
    owner = OwnerCut(conn, key, ["m1", "m2"])
    try:
        outcome = owner.take(
            lock_acquire=lock.acquire,
            lock_release=lock.release,
            ready_timeout=5,
            open_timeout=0.4,
            retries=retries,
            should_stop=lambda: False,
            now=now_utc,
        )
    except CutFailed as exc:
        outcome = exc
    for thread in parts:
        thread.join(10)
    return outcome, results


def test_a_late_part_fails_the_round_and_the_cut_is_retried(cut_keys):
    conn, key = cut_keys
    lock = LockState()
    coordinates, results = take_cut(conn, key, lock, late_rounds=1, retries=3)
    assert lock.acquired == 2 and not lock.held
    assert coordinates == {"m1": {"file": "bin-m1", "pos": 2}, "m2": {"file": "bin-m2", "pos": 2}}
    assert results["m1"][0] == coordinates["m1"] and results["m1"][1]  # the owner's instant
    assert results["m1-rollbacks"] == 1  # its first snapshot was not at the cut


def test_a_part_late_every_round_fails_the_cut_naming_it_with_the_lock_released(cut_keys):
    conn, key = cut_keys
    lock = LockState()
    failure, results = take_cut(conn, key, lock, late_rounds=-1, retries=2)
    assert isinstance(failure, CutFailed) and failure.part == "m2"
    assert "part m2 did not open its snapshot within 0.4 s" in str(failure)
    assert "(3 attempts)" in str(failure)
    assert lock.acquired == 3 and not lock.held
    assert isinstance(results["m1"], CutFailed) and isinstance(results["m2"], CutFailed)
