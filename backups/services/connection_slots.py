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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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
