"""backups.services.parts: parts of one job on real rqworker processes and real Redis."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis as redis_lib
from rq import Worker

from backups import queue
from backups.services.parts import (
    Part,
    PartFailed,
    PartsCancelled,
    parts_run,
)
from backups.services.progress import worker_name

PART = "tests.backups.test_parts.sleepy_part"


def sleepy_part(ctx, seconds: float, fail: str = "") -> dict:
    """A part that works `seconds` in small steps, stopping when the owner aborts."""
    ctx.redis.set(ctx.key("pid", ctx.name), os.getpid(), ex=60)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.aborted():
            raise RuntimeError(f"stopped: {ctx.abort_reason}")
        time.sleep(0.05)
    if fail:
        raise RuntimeError(fail)
    return {"pid": os.getpid(), "local": ctx.local}


def _wait_for_workers(redis_url: str, count: int, timeout: float = 40) -> None:
    conn = redis_lib.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    # Registered and waiting on its queues (a starting worker registers before it listens).
    while sum(w.get_state() == "idle" for w in Worker.all(connection=conn)) < count:
        assert time.monotonic() < deadline, "the rqworker processes did not start"
        time.sleep(0.2)


def test_parts_run_on_other_workers_and_the_owner_runs_what_nobody_took(
    rq_worker_process, redis_url
):
    rq_worker_process(queue.RESTORES)
    rq_worker_process(queue.RESTORES)
    _wait_for_workers(redis_url, 2)

    outcomes = parts_run(
        owner="test-spread",
        parts=[Part(f"p{i}", (2.5,)) for i in range(3)],
        function=PART,
        queue_name=queue.RESTORES,
        claim_after=1.0,
        stale_after=5,
    )

    assert all(o.ok for o in outcomes.values()), outcomes
    workers = {o.worker for o in outcomes.values()}
    assert len(workers) == 3, workers  # two rqworkers and the owner, one part each
    local = [o for o in outcomes.values() if o.local]
    assert len(local) == 1 and local[0].worker == worker_name()
    assert local[0].result == {"pid": os.getpid(), "local": True}
    for outcome in outcomes.values():
        if not outcome.local:
            host, pid = outcome.worker.rsplit(":", 1)
            assert outcome.result == {"pid": int(pid), "local": False}


def test_without_idle_workers_the_owner_runs_every_part_at_once():
    started = time.monotonic()
    outcomes = parts_run(
        owner="test-alone",
        parts=[Part("a", (0.2,)), Part("b", (0.2,))],
        function=PART,
        queue_name=queue.RESTORES,
        claim_after=30,
        stale_after=5,
    )
    assert time.monotonic() - started < 3  # nobody listens: no wait for claim_after
    assert {o.worker for o in outcomes.values()} == {worker_name()}
    assert all(o.ok and o.local for o in outcomes.values())


def test_a_failing_part_fails_fast_and_the_others_see_the_abort():
    started = time.monotonic()
    with pytest.raises(PartFailed) as failed:
        parts_run(
            owner="test-fail",
            parts=[Part("bad", (0.2, "disk on fire")), Part("slow", (30,))],
            function=PART,
            queue_name=queue.RESTORES,
            claim_after=0.1,
            stale_after=5,
        )
    assert time.monotonic() - started < 5
    assert failed.value.part == "bad" and "disk on fire" in str(failed.value)
    assert "stopped: part bad failed" in failed.value.outcomes["slow"].error


def test_cancel_reaches_every_part():
    asked = time.monotonic() + 1.0
    with pytest.raises(PartsCancelled) as cancelled:
        parts_run(
            owner="test-cancel",
            parts=[Part("a", (30,)), Part("b", (30,))],
            function=PART,
            queue_name=queue.RESTORES,
            claim_after=0.1,
            stale_after=5,
            should_cancel=lambda: time.monotonic() > asked,
        )
    assert time.monotonic() - asked < 3
    assert all("stopped: cancelled" in o.error for o in cancelled.value.outcomes.values())


def test_a_killed_part_worker_is_detected_by_its_heartbeat(rq_worker_process, redis_url):
    worker = rq_worker_process(queue.RESTORES)
    _wait_for_workers(redis_url, 1)
    conn = redis_lib.Redis.from_url(redis_url)
    killed_at: list[float] = []

    def kill_when_running(handle) -> None:
        def watch() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                # Once both run: the owner took "local" after claim_after.
                pid, local = conn.mget(handle.key("pid", "remote"), handle.key("pid", "local"))
                if pid is not None and local is not None:
                    assert int(pid) != os.getpid(), "no worker took the part"
                    # The work horse (in a session of its own) that runs the part, and its
                    # worker.
                    os.kill(int(pid), signal.SIGKILL)
                    os.killpg(worker.pid, signal.SIGKILL)
                    killed_at.append(time.monotonic())
                    return
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()

    with pytest.raises(PartFailed) as failed:
        parts_run(
            owner="test-kill",
            parts=[Part("remote", (30,)), Part("local", (30,))],
            function=PART,
            queue_name=queue.RESTORES,
            claim_after=3.0,
            stale_after=2,
            on_start=kill_when_running,
        )
    detected = time.monotonic() - killed_at[0]
    assert detected < 2 + 1.5, detected
    assert failed.value.part == "remote"
    assert "stopped beating" in failed.value.message
    assert failed.value.worker != worker_name()
    # The part the owner ran saw the abort and stopped.
    assert "stopped: part remote died" in failed.value.outcomes["local"].error
