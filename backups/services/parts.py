"""Parts: one job's work spread over many RQ workers, with the owner as the worker of last resort.

The job that owns some work (a restore run, a backup set) splits it into named parts and
calls `parts_run`. Each part becomes one RQ job (`backups.jobs.parts.part_job`, id
`<owner>-part-<name>`) that calls `function(ctx, *args)` on whichever worker takes it,
`function` being the dotted path of a service function returning a small JSON-able dict:

    def restore_part(ctx: PartContext, run_id: int, instance_id: int) -> dict:
        ...                      # poll ctx.aborted() between units of work
        return {"shards": [...]}

    outcomes = parts_run(
        owner=f"restore-{run.pk}",
        parts=[Part("i3", (run.pk, 3)), Part("i4", (run.pk, 4))],
        function="backups.services.restore_runs.restore_part",
        queue_name=queue.RESTORES,
        should_cancel=tracker.should_cancel,
    )
    outcomes["i3"].result, outcomes["i3"].worker      # {"shards": [...]}, "host:pid"

Promises:
- A part runs at most once per `parts_run` call: the owner and the workers claim it
  atomically (Redis SET NX) before running it.
- Parts beyond the number of workers idle on the queue when they are enqueued, and a
  part no worker claimed within `claim_after` seconds (PARTS_CLAIM_AFTER_SECONDS,
  default 3) or that finds no idle worker listening on the queue, are claimed by the
  owner and run in a thread of the owner's process, so one worker alone still does all
  the work (without waiting). A BaseException in such a thread (the owner's process
  dying) is raised in the owner's thread.
- While a part runs, a thread beats its heartbeat. A part whose heartbeat stands still
  for `stale_after` seconds (JOB_HEARTBEAT_STALE_SECONDS) counts as dead (its worker was
  killed): `parts_run` raises PartFailed naming the part and its worker.
- Fail fast: the first part that raised, or died, sets the abort flag every part polls
  through `ctx.aborted()`, `parts_run` waits (at most `stale_after` seconds) for the other
  running parts to stop, then raises PartFailed. `should_cancel()` turning true does the
  same and raises PartsCancelled. The owner beats too: a part whose owner stopped beating
  sees `ctx.aborted()` true and stops.
- Every Redis key lives under `shardvault:parts:<owner>:<attempt>:` with a TTL, so a crash
  leaves nothing behind for long. Each `parts_run` call is a new attempt (fresh keys): a
  part job left over from a dead earlier attempt finds its attempt gone and does nothing.

A part the owner runs itself runs in a thread of the owner's process (`ctx.local` is
True): part functions must be thread-safe, and get their own database connections (closed
when the part ends).

Extra coordination between owner and parts (a barrier, say) can use `ctx.key(...)` on the
part side and `PartsHandle.key(...)` on the owner side (pass `on_start` to get the handle):
both name the same keys under the attempt's prefix, with `ctx.redis` / `handle.redis`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connections
from django.utils.module_loading import import_string

from backups import queue
from backups.services.progress import worker_name

log = logging.getLogger(__name__)

KEY_PREFIX = "shardvault:parts:"
RESULT_TTL_SECONDS = 24 * 3600  # results, claims and the abort flag of one attempt
PART_JOB = "backups.jobs.parts.part_job"
PART_JOB_TIMEOUT_SECONDS = 24 * 3600
POLL_SECONDS = 0.2
# A heartbeat window shorter than this would call a busy but live part dead.
MIN_STALE_SECONDS = 2.0

# Claims a part atomically, only while its attempt is alive (owner beating, no abort).
# KEYS: claim, owner beat, abort, part beat. ARGV: worker, ttl, beat ttl.
_CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
  return 0
end
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[3]))
return 1
"""


@dataclass(frozen=True)
class Part:
    """One part: a name unique within its owner, and the JSON-able args of its function."""

    name: str
    args: tuple = ()


@dataclass
class PartOutcome:
    """What one part returned (`result`), or why it failed (`error`), and who ran it."""

    name: str
    worker: str = ""
    local: bool = False  # run by the owner itself
    result: dict | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None and not self.error


class PartFailed(Exception):
    """A part raised, or its worker stopped beating. `outcomes`: every part known so far."""

    def __init__(self, part: str, message: str, *, worker: str = "", outcomes=None) -> None:
        super().__init__(f"part {part}{f' on {worker}' if worker else ''}: {message}")
        self.part = part
        self.worker = worker
        self.message = message
        self.outcomes: dict[str, PartOutcome] = outcomes or {}


class PartsCancelled(Exception):
    """`should_cancel()` turned true; every running part was told to stop."""

    def __init__(self, outcomes=None) -> None:
        super().__init__("cancelled")
        self.outcomes: dict[str, PartOutcome] = outcomes or {}


class _Keys:
    """The Redis keys of one attempt."""

    def __init__(self, owner: str, attempt: str) -> None:
        self.prefix = f"{KEY_PREFIX}{owner}:{attempt}:"

    def key(self, *suffix: str) -> str:
        return self.prefix + ":".join(suffix)

    @property
    def owner_beat(self) -> str:
        return self.key("owner-beat")

    @property
    def abort(self) -> str:
        return self.key("abort")

    def claim(self, part: str) -> str:
        return self.key("part", part, "claim")

    def beat(self, part: str) -> str:
        return self.key("part", part, "beat")

    def result(self, part: str) -> str:
        return self.key("part", part, "result")

    @property
    def done(self) -> str:
        """A list each part pushes its name onto once its result is published: the owner
        waits on it (BLPOP) between polls, so a finished part is seen at once."""
        return self.key("done")


class _Watch:
    """Tells when a heartbeat counter stood still for `stale_after` s, on the watcher's clock
    (owner and parts may run on hosts whose clocks disagree)."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.value: Any = None
        self.changed = time.monotonic()

    def stale(self, value: Any) -> bool:
        now = time.monotonic()
        if value != self.value:
            self.value = value
            self.changed = now
        return now - self.changed >= self.stale_after


class _Beater(threading.Thread):
    """INCRs one key every `every` seconds (with a TTL) until stopped; optionally keeps a
    second key (a claim) alive."""

    def __init__(self, redis, key: str, *, every: float, ttl: int, keep: str = "") -> None:
        super().__init__(daemon=True, name=f"beat {key}")
        self.redis, self.key, self.every, self.ttl, self.keep = redis, key, every, ttl, keep
        self.stopping = threading.Event()

    def beat(self) -> None:
        pipe = self.redis.pipeline()
        pipe.incr(self.key)
        pipe.expire(self.key, self.ttl)
        if self.keep:
            pipe.expire(self.keep, RESULT_TTL_SECONDS)
        pipe.execute()

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; too many look stale
                log.warning("heartbeat %s failed", self.key)

    def stop(self) -> None:
        self.stopping.set()


def _beat_every(stale_after: float) -> float:
    return max(0.2, stale_after / 4)


# ------------------------------------------------------------------------------ part side


class PartContext:
    """What a part's function gets: who it is, where its keys are, and `aborted()`."""

    def __init__(self, handle: dict, *, worker: str, local: bool = False) -> None:
        self.owner: str = handle["owner"]
        self.attempt: str = handle["attempt"]
        self.name: str = handle["part"]
        self.stale_after: float = float(handle["stale_after"])
        self.worker = worker
        self.local = local
        self.redis = queue.redis_connection(handle["queue"])
        self._keys = _Keys(self.owner, self.attempt)
        self._owner_watch = _Watch(self.stale_after)
        self._checked = 0.0
        self._aborted = ""

    def key(self, *suffix: str) -> str:
        """A Redis key under this attempt's prefix (the owner's `PartsHandle.key` names it too)."""
        return self._keys.key(*suffix)

    def aborted(self) -> bool:
        """True once the owner aborted (cancel, another part failed) or stopped beating.

        Reads Redis at most every POLL_SECONDS; cheap enough to call per chunk.
        """
        if self._aborted:
            return True
        now = time.monotonic()
        if now - self._checked < POLL_SECONDS:
            return False
        self._checked = now
        try:
            abort, beat = self.redis.mget(self._keys.abort, self._keys.owner_beat)
        except Exception:  # noqa: BLE001 - Redis gone: the owner cannot see us either
            if self._owner_watch.stale(self._owner_watch.value):
                self._aborted = "Redis cannot be reached"
            return bool(self._aborted)
        if abort is not None:
            self._aborted = abort.decode() if isinstance(abort, bytes) else str(abort)
        elif self._owner_watch.stale(beat):
            self._aborted = f"the owner {self.owner} stopped beating"
        return bool(self._aborted)

    @property
    def abort_reason(self) -> str:
        return self._aborted

    def _publish(self, record: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.set(self._keys.result(self.name), json.dumps(record), ex=RESULT_TTL_SECONDS)
        pipe.rpush(self._keys.done, self.name)
        pipe.expire(self._keys.done, RESULT_TTL_SECONDS)
        pipe.execute()


def _claim(redis, keys: _Keys, part: str, worker: str, stale_after: float) -> bool:
    script = redis.register_script(_CLAIM)
    beat_ttl = int(max(2, stale_after * 2))
    claimed = script(
        keys=[keys.claim(part), keys.owner_beat, keys.abort, keys.beat(part)],
        args=[worker, RESULT_TTL_SECONDS, beat_ttl],
    )
    return bool(claimed)


def _execute_claimed(handle: dict, ctx: PartContext) -> None:
    """Run a claimed part with its heartbeat and publish its result or error."""
    keys = _Keys(ctx.owner, ctx.attempt)
    beater = _Beater(
        ctx.redis,
        keys.beat(ctx.name),
        every=_beat_every(ctx.stale_after),
        ttl=int(max(2, ctx.stale_after * 2)),
        keep=keys.claim(ctx.name),
    )
    beater.start()
    record: dict[str, Any] = {"worker": ctx.worker}
    try:
        function = import_string(handle["function"])
        result = function(ctx, *handle["args"])
        record["result"] = result if result is not None else {}
    except Exception as exc:  # noqa: BLE001 - published for the owner, which fails the job
        log.exception("part %s of %s failed on %s", ctx.name, ctx.owner, ctx.worker)
        record["error"] = str(exc) or exc.__class__.__name__
    finally:
        beater.stop()
    try:
        ctx._publish(record)
    except Exception:  # noqa: BLE001 - the owner sees the heartbeat stop instead
        log.exception("part %s of %s could not publish its outcome", ctx.name, ctx.owner)


def part_execute(handle: dict) -> str:
    """The worker side of one part (what `backups.jobs.parts.part_job` calls).

    Claims the part; runs nothing when the owner or another worker has it, or when its
    attempt is over (aborted, owner gone). Returns a line for RQ's job result.
    """
    ctx = PartContext(handle, worker=worker_name())
    keys = _Keys(ctx.owner, ctx.attempt)
    if not _claim(ctx.redis, keys, ctx.name, ctx.worker, ctx.stale_after):
        holder = ctx.redis.get(keys.claim(ctx.name))
        if holder:
            return f"part {ctx.name} of {ctx.owner} is run by {holder.decode()}"
        return f"part {ctx.name} of {ctx.owner}: its attempt is over"
    try:
        _execute_claimed(handle, ctx)
    finally:
        connections.close_all()
    return f"part {ctx.name} of {ctx.owner} ran on {ctx.worker}"


# ------------------------------------------------------------------------------ owner side


@dataclass
class PartsHandle:
    """The owner's view of one attempt, given to `on_start` (for extra coordination keys)."""

    owner: str
    attempt: str
    redis: Any
    parts: list[str] = field(default_factory=list)

    def key(self, *suffix: str) -> str:
        return _Keys(self.owner, self.attempt).key(*suffix)

    def abort(self, reason: str) -> None:
        """Tell every part to stop (they see `ctx.aborted()`); the first reason given stays."""
        key = _Keys(self.owner, self.attempt).abort
        self.redis.set(key, reason, ex=RESULT_TTL_SECONDS, nx=True)


def parts_run(
    *,
    owner: str,
    parts: list[Part],
    function: str,
    queue_name: str,
    should_cancel: Callable[[], bool] = lambda: False,
    claim_after: float | None = None,
    stale_after: float | None = None,
    timeout: int = PART_JOB_TIMEOUT_SECONDS,
    on_start: Callable[[PartsHandle], None] | None = None,
    on_outcome: Callable[[PartOutcome], None] | None = None,
    run_untaken: bool = True,
) -> dict[str, PartOutcome]:
    """Run every part (on workers, or here when none takes it) and return their outcomes.

    Raises PartFailed (a part raised or died; the others were told to stop and waited for)
    or PartsCancelled. `on_outcome` runs in the owner's thread as each part finishes.
    With `run_untaken=False` the owner never runs a part itself: an untaken part waits for
    a worker until `should_cancel()` (the caller's own timeout) ends the run.
    See the module docstring for the promises.
    """
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"part names of {owner} are not unique: {names}")
    claim_after = float(settings.PARTS_CLAIM_AFTER_SECONDS if claim_after is None else claim_after)
    stale_after = max(
        MIN_STALE_SECONDS,
        float(settings.JOB_HEARTBEAT_STALE_SECONDS if stale_after is None else stale_after),
    )
    redis = queue.redis_connection(queue_name)
    attempt = uuid.uuid4().hex[:12]
    keys = _Keys(owner, attempt)
    handle = PartsHandle(owner=owner, attempt=attempt, redis=redis, parts=names)
    me = worker_name()
    beat_ttl = int(max(2, stale_after * 2))
    owner_beater = _Beater(redis, keys.owner_beat, every=_beat_every(stale_after), ttl=beat_ttl)
    owner_beater.beat()
    owner_beater.start()
    base = {
        "owner": owner,
        "attempt": attempt,
        "function": function,
        "queue": queue_name,
        "stale_after": stale_after,
    }
    handles = {p.name: {**base, "part": p.name, "args": list(p.args)} for p in parts}
    job_ids = {}
    outcomes: dict[str, PartOutcome] = {}
    local_threads: dict[str, threading.Thread] = {}
    watches = {name: _Watch(stale_after) for name in names}
    claimed: dict[str, str] = {}
    crashes: dict[str, BaseException] = {}
    try:
        if on_start is not None:
            on_start(handle)
        # Counted before the parts are enqueued, while the workers that take them still idle.
        idle = queue.idle_workers(queue_name) if run_untaken else 0
        for part in parts:
            job_id = f"{owner}-part-{part.name}"
            job_ids[part.name] = job_id
            # None when a part job of a dead earlier attempt still looks live: then nobody
            # claims this attempt's part and the owner runs it.
            queue.enqueue(
                PART_JOB,
                handles[part.name],
                queue=queue_name,
                job_id=job_id,
                description=f"part {part.name} of {owner}",
                timeout=timeout,
                result_ttl=3600,
                failure_ttl=24 * 3600,
            )
        started = time.monotonic()

        def take(name: str) -> None:
            """Claim `name` for the owner and run it in a thread here (unless taken)."""
            if not _claim(redis, keys, name, me, stale_after):
                return
            claimed[name] = me
            queue.dequeue_if_waiting(job_ids[name], queue=queue_name)
            thread = threading.Thread(
                target=_run_local,
                args=(handles[name], me, crashes),
                daemon=True,
                name=f"part {name} of {owner}",
            )
            local_threads[name] = thread
            thread.start()

        # Parts beyond the workers idle at the start would wait for one (or for the poll
        # below to find nobody free): the owner takes them at once, from the last.
        if run_untaken:
            for name in reversed(names[idle:]):
                take(name)
        failure: PartFailed | None = None
        cancelled = False
        while True:
            pending = [n for n in names if n not in outcomes]
            if not pending:
                break
            if crashes:  # a part the owner ran died with the owner's own death (BaseException)
                raise next(iter(crashes.values()))
            nobody_free: bool | None = None
            if failure is None and not cancelled and should_cancel():
                cancelled = True
                handle.abort("cancelled")
                wind_down = time.monotonic()
            # Once the abort is set no claim succeeds: a part unclaimed in a read made after
            # it will never run. (One read before it may miss a claim made just then.)
            stopping = failure is not None or cancelled
            pipe = redis.pipeline()
            for name in pending:
                pipe.get(keys.claim(name))
                pipe.get(keys.beat(name))
                pipe.get(keys.result(name))
            values = pipe.execute()
            for i, name in enumerate(pending):
                holder, beat, raw = values[3 * i : 3 * i + 3]
                if holder is not None:
                    claimed[name] = holder.decode()
                if raw is not None:
                    record = json.loads(raw)
                    outcome = PartOutcome(
                        name=name,
                        worker=record.get("worker", claimed.get(name, "")),
                        local=name in local_threads,
                        result=record.get("result"),
                        error=record.get("error", ""),
                    )
                    outcomes[name] = outcome
                    if name in local_threads:
                        local_threads[name].join()
                    if on_outcome is not None:
                        on_outcome(outcome)
                    if outcome.error and failure is None and not cancelled:
                        failure = PartFailed(name, outcome.error, worker=outcome.worker)
                        handle.abort(f"part {name} failed")
                        wind_down = time.monotonic()
                    continue
                if name not in claimed:
                    if stopping:
                        outcomes[name] = PartOutcome(name=name, error="not started")
                        continue
                    if failure is not None or cancelled:
                        continue  # read again, after the abort
                    if nobody_free is None:
                        # No idle worker listens on the queue: nobody else will take it.
                        nobody_free = time.monotonic() - started >= POLL_SECONDS and (
                            queue.idle_workers(queue_name) == 0
                        )
                    waited = time.monotonic() - started >= claim_after
                    if run_untaken and (waited or nobody_free):
                        take(name)
                    continue
                if watches[name].stale(beat):
                    worker = claimed[name]
                    message = f"its worker stopped beating for {stale_after:g} s (killed or hung)"
                    outcomes[name] = PartOutcome(name=name, worker=worker, error=message)
                    if on_outcome is not None:
                        on_outcome(outcomes[name])
                    if failure is None and not cancelled:
                        failure = PartFailed(name, message, worker=worker)
                        handle.abort(f"part {name} died")
                        wind_down = time.monotonic()
            if (failure is not None or cancelled) and time.monotonic() - wind_down > stale_after:
                for name in names:
                    outcomes.setdefault(
                        name,
                        PartOutcome(
                            name=name,
                            worker=claimed.get(name, ""),
                            error="did not stop in time after the abort",
                        ),
                    )
                break
            # Woken early by a part that finished; BLPOP takes fractions of a second on
            # Redis >= 6 (as the barrier's waits do).
            redis.blpop([keys.done], timeout=POLL_SECONDS)
        if failure is not None:
            failure.outcomes = outcomes
            raise failure
        if cancelled:
            raise PartsCancelled(outcomes)
        return outcomes
    except BaseException:
        try:
            handle.abort("the owner failed")
        except Exception:  # noqa: BLE001 - parts see the owner stop beating instead
            pass
        for name, job_id in job_ids.items():
            if name not in claimed:
                queue.cancel(job_id, queue=queue_name)
        for thread in local_threads.values():  # they saw the abort; let them stop writing
            thread.join(timeout=stale_after)
        raise
    finally:
        owner_beater.stop()


def _run_local(handle: dict, worker: str, crashes: dict[str, BaseException]) -> None:
    """A part claimed by the owner, in one of the owner's threads. What is not an Exception
    (KeyboardInterrupt, SystemExit) is handed to the owner, which raises it in its thread."""
    ctx = PartContext(handle, worker=worker, local=True)
    try:
        _execute_claimed(handle, ctx)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the owner
        crashes[ctx.name] = exc
    finally:
        connections.close_all()
