"""Per-instance caps on concurrent connections, shared by every worker through Redis.

Each MySQL server (keyed by host:port, since two clusters may register the same
server) has a sorted set of held slots scored by their expiry time. A holder takes
its slots on every instance it needs in one atomic Lua script (all or nothing, so
two workers can never deadlock holding half of each other's instances), refreshes
their expiry from its heartbeat, and releases them when done. A worker killed with
SIGKILL cannot release: its slots simply expire after `ttl`.

    needs = {"127.0.0.1:3306": SlotNeed(cap=4, minimum=2, wanted=4)}
    with ConnectionSlots(redis, needs, holder="backup-7") as slots:
        slots.acquire(wait=..., should_cancel=...)   # {"127.0.0.1:3306": granted}
        ...
        slots.refresh()                                # from a heartbeat

A job that is not a full backup or a restore holds its slots with one context manager,
which waits (bounded, saying "waiting for a connection slot on <instance> — connections in
use: 3 of 3 (backup-12)") and refreshes them from the job's heartbeat:

    needs, names = instance_needs(instances, minimum=1)
    with connection_slots_held(needs=needs, names=names, holder="incremental-13",
                               wait=600, tracker=tracker) as granted:
        ...

`slot_holders` and `slots_usage_text` say who holds a server's slots (the cluster page);
`slots_short` probes without taking anything (a scheduled tick skipped at the cap).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings

from backups import queue

log = logging.getLogger(__name__)

KEY_PREFIX = "shardvault:conn-slots:"

# KEYS: one sorted set per instance. ARGV: now, expiry, holder, then (cap, minimum, wanted)
# per key. Grants min(wanted, free) on every key when each has at least `minimum` free,
# else nothing. Returns the grants in key order, or an empty list.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2])
local holder = ARGV[3]
local grants = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local cap = tonumber(ARGV[1 + 3 * i])
  local minimum = tonumber(ARGV[2 + 3 * i])
  local wanted = tonumber(ARGV[3 + 3 * i])
  local free = cap - redis.call('ZCARD', key)
  if free < minimum then return {} end
  grants[i] = math.min(wanted, free)
end
for i, key in ipairs(KEYS) do
  for j = 1, grants[i] do
    redis.call('ZADD', key, expiry, holder .. ':' .. j)
  end
  redis.call('EXPIRE', key, math.ceil(expiry - now) + 60)
end
return grants
"""


@dataclass(frozen=True)
class SlotNeed:
    cap: int  # Instance.max_connections
    minimum: int  # fewest connections the job can work with
    wanted: int  # most it would use


def instance_slot_key(address: str) -> str:
    return f"{KEY_PREFIX}{address}"


def slots_in_use(redis, address: str) -> int:
    """How many connection slots are held right now on one server ("host:port")."""
    return int(redis.zcount(instance_slot_key(address), time.time(), "+inf"))


class SlotsUnavailable(Exception):
    pass


class ConnectionSlots:
    """Slots on several instances for one holder (a job); see the module docstring."""

    def __init__(self, redis, needs: dict[str, SlotNeed], *, holder: str, ttl: float = 60):
        for address, need in needs.items():
            if need.minimum > need.cap:
                raise SlotsUnavailable(
                    f"instance {address} allows {need.cap} connection(s) from ShardVault "
                    f"but this job needs at least {need.minimum}; raise its max connections"
                )
        self.redis = redis
        self.needs = needs
        self.keys = [instance_slot_key(a) for a in needs]
        self.holder = holder
        self.ttl = ttl
        self.granted: dict[str, int] = {}
        self._script = redis.register_script(_ACQUIRE)

    def try_acquire(self) -> dict[str, int]:
        """Take slots on every instance at once; {} when one lacks its minimum."""
        now = time.time()
        args: list = [now, now + self.ttl, self.holder]
        for need in self.needs.values():
            args += [need.cap, need.minimum, need.wanted]
        grants = self._script(keys=self.keys, args=args) or []
        self.granted = {a: int(g) for a, g in zip(self.needs, grants, strict=False)}
        return self.granted

    def acquire(
        self,
        *,
        wait: float,
        should_cancel: Callable[[], bool] = lambda: False,
        poll: float = 0.5,
    ) -> dict[str, int]:
        """Block until every instance grants its minimum; raise SlotsUnavailable after `wait` s."""
        deadline = time.monotonic() + wait
        while True:
            if self.try_acquire():
                return self.granted
            if should_cancel() or time.monotonic() >= deadline:
                raise SlotsUnavailable(self._busy_message())
            time.sleep(poll)

    def _busy_message(self) -> str:
        full = [
            a
            for a, need in self.needs.items()
            if slots_in_use(self.redis, a) > need.cap - need.minimum
        ]
        where = ", ".join(full) or "an instance"
        return f"the connection slots of {where} stayed in use by other jobs"

    def _members(self, address: str) -> list[str]:
        return [f"{self.holder}:{j}" for j in range(1, self.granted.get(address, 0) + 1)]

    def refresh(self) -> None:
        """Push the expiry of the held slots forward (call from a heartbeat)."""
        if not self.granted:
            return
        expiry = time.time() + self.ttl
        pipe = self.redis.pipeline()
        for address in self.granted:
            for member in self._members(address):
                pipe.zadd(instance_slot_key(address), {member: expiry}, xx=True)
        pipe.execute()

    def release(self) -> None:
        if not self.granted:
            return
        pipe = self.redis.pipeline()
        for address in self.granted:
            members = self._members(address)
            if members:
                pipe.zrem(instance_slot_key(address), *members)
        pipe.execute()
        self.granted = {}

    def __enter__(self) -> ConnectionSlots:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------ holders, probes, waiting


def slot_holders(redis, address: str) -> dict[str, int]:
    """Who holds live slots on one server right now: holder -> slots, biggest first."""
    members = redis.zrangebyscore(instance_slot_key(address), time.time(), "+inf")
    counts: dict[str, int] = {}
    for member in members:
        text = member.decode() if isinstance(member, bytes) else str(member)
        holder = text.rsplit(":", 1)[0]
        counts[holder] = counts.get(holder, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def slot_holders_text(holders: dict[str, int]) -> str:
    """Holders (as `slot_holders` gives them) as text: "backup-12 ×2, incremental-13"."""
    return ", ".join(h if n == 1 else f"{h} ×{n}" for h, n in holders.items())


def slots_usage_text(redis, address: str, cap: int) -> str:
    """Slots in use on one server as text: "3 of 4 (backup-12 ×2, incremental-13)", "0 of 4"."""
    holders = slot_holders(redis, address)
    names = slot_holders_text(holders)
    return f"{sum(holders.values())} of {cap}" + (f" ({names})" if names else "")


def slots_short(redis, needs: dict[str, SlotNeed]) -> list[str]:
    """The addresses of `needs` that could not grant their minimum now (a probe: takes
    nothing, so a caller that goes on must still acquire)."""
    return [a for a, need in needs.items() if need.cap - slots_in_use(redis, a) < need.minimum]


def slots_wait(
    slots: ConnectionSlots,
    *,
    wait: float,
    names: dict[str, str] | None = None,
    say: Callable[[str], None] | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    poll: float = 0.5,
) -> dict[str, int]:
    """`slots.acquire` that tells, while it waits, which instance is at its cap.

    `say(text)` gets "waiting for a connection slot on <instance> — connections in use:
    2 of 2 (backup-12)" whenever that line changes. After `wait` seconds (or a cancel) it raises
    SlotsUnavailable with one sentence naming the instance at its cap and its holders.
    `names` maps addresses to instance names for those sentences.
    """
    names = names or {}
    deadline = time.monotonic() + wait
    said = ""
    while True:
        if slots.try_acquire():
            return slots.granted
        short = slots_short(slots.redis, slots.needs) or list(slots.needs)
        line = "; ".join(
            f"{names.get(a, a)} — connections in use: "
            f"{slots_usage_text(slots.redis, a, slots.needs[a].cap)}"
            for a in short
        )
        if say is not None and line != said:
            say(f"waiting for a connection slot on {line}")
            said = line
        if should_cancel() or time.monotonic() >= deadline:
            raise SlotsUnavailable(slots_at_cap_sentence(slots.redis, slots.needs, short, names))
        time.sleep(poll)


def slots_at_cap_sentence(
    redis,
    needs: dict[str, SlotNeed],
    short: list[str],
    names: dict[str, str],
    *,
    advice: str = "; try again when those jobs end, or raise its max connections",
) -> str:
    """One sentence: which instance is at its connection cap, and who holds its slots."""
    parts = []
    for a in short:
        holders = slot_holders_text(slot_holders(redis, a)) or "jobs that just ended"
        parts.append(
            f"instance {names.get(a, a)} ({a}) is at its cap of {needs[a].cap} connection(s) "
            f"from ShardVault, in use by {holders}"
        )
    return "; ".join(parts) + advice


# ------------------------------------------------------------------ one job's slots, held


def slot_ttl() -> float:
    """Expiry of a held slot: two heartbeat-stale windows, and never under four beats (the
    tracker beats every max(1 s, stale / 4)), so only a dead holder loses its slots."""
    stale = float(settings.JOB_HEARTBEAT_STALE_SECONDS)
    return max(4 * max(1.0, stale / 4), 2 * stale)


def instance_needs(
    instances: Iterable, *, minimum: int = 1, wanted: int | None = None
) -> tuple[dict[str, SlotNeed], dict[str, str]]:
    """(needs, names) for a job that opens at most `wanted` (at least `minimum`) connections
    at once to each server among `instances` (Instance rows; two rows for one host:port are
    one server, capped by the smaller max_connections)."""
    caps: dict[str, int] = {}
    names: dict[str, str] = {}
    for instance in instances:
        address = f"{instance.host}:{instance.port}"
        caps[address] = min(caps.get(address, instance.max_connections), instance.max_connections)
        names.setdefault(address, instance.name)
    wanted = minimum if wanted is None else max(minimum, wanted)
    needs = {
        a: SlotNeed(cap=cap, minimum=minimum, wanted=min(cap, wanted)) for a, cap in caps.items()
    }
    return needs, names


class _Refreshes:
    """Two slot holders kept alive by one tracker (a job that already held slots)."""

    def __init__(self, *held):
        self.held = held

    def refresh(self) -> None:
        for slots in self.held:
            slots.refresh()


@contextmanager
def connection_slots_held(
    *,
    needs: dict[str, SlotNeed],
    holder: str,
    wait: float,
    names: dict[str, str] | None = None,
    tracker=None,
    say: Callable[[str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    queue_name: str = queue.DEFAULT,
    ttl: float | None = None,
) -> Iterator[dict[str, int] | None]:
    """Hold `holder`'s slots on every server of `needs` for the block; yields the grants.

    Waits up to `wait` s, saying "waiting for a connection slot on <instance>: ..." through
    `say` (or `tracker.say`), then raises SlotsUnavailable naming the instance at its cap.
    The slots are refreshed by `tracker`'s heartbeat (or, without a tracker, by a thread of
    their own) and released when the block ends; a SIGKILLed holder's expire after `ttl`.
    Without Redis (nobody to share the servers with) it yields None and holds nothing.
    """
    if not needs:
        yield {}
        return
    if say is None and tracker is not None:
        say = tracker.say
    if should_cancel is None:
        should_cancel = tracker.should_cancel if tracker is not None else (lambda: False)
    try:
        redis = queue.redis_connection(queue_name)
        slots = ConnectionSlots(redis, needs, holder=holder, ttl=ttl or slot_ttl())
        granted = slots_wait(slots, wait=wait, names=names, say=say, should_cancel=should_cancel)
    except queue.QueueUnavailable as exc:
        log.warning("connection slots of %s not taken, Redis is not reachable: %s", holder, exc)
        yield None
        return
    stop = threading.Event()
    beat = None
    previous = None
    if tracker is not None:
        previous = tracker.slots
        tracker.slots = slots if previous is None else _Refreshes(previous, slots)
    else:
        beat = threading.Thread(
            target=_refresh_until, args=(slots, stop), name=f"slots-{holder}", daemon=True
        )
        beat.start()
    try:
        yield granted
    finally:
        stop.set()
        if beat is not None:
            beat.join(timeout=5)
        if tracker is not None:
            tracker.slots = previous
        try:
            slots.release()
        except queue.QueueUnavailable:  # they expire on their own
            log.warning("releasing the connection slots of %s failed", holder)


def _refresh_until(slots: ConnectionSlots, stop: threading.Event) -> None:
    while not stop.wait(slots.ttl / 4):
        try:
            slots.refresh()
        except Exception:  # noqa: BLE001 - a missed refresh is retried; they expire otherwise
            log.debug("refreshing the connection slots of %s failed", slots.holder)
