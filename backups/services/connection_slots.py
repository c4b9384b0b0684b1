"""Per-instance caps on concurrent connections, shared by every worker through Redis.

Each MySQL server (keyed by host:port, since two clusters may register the same
server) has a sorted set of held slots scored by their expiry time. A holder takes
the same number of slots on every instance it needs in one atomic Lua script (all
or nothing, so two workers can never deadlock holding half of each other's
instances), refreshes their expiry while it works, and releases them when done.
A worker killed with SIGKILL cannot release: its slots simply expire after `ttl`.

Used by backups (and restores, which open connections to the same servers):

    with ConnectionSlots(redis, {"127.0.0.1:3306": 4}, want=4, holder="backup-7") as slots:
        slots.acquire(wait=..., should_cancel=...)   # returns the count granted (>= 1)
        ...
        slots.refresh()                                # from a heartbeat
"""

from __future__ import annotations

import time
from collections.abc import Callable

KEY_PREFIX = "shardvault:conn-slots:"

# KEYS: one sorted set per instance. ARGV: now, expiry, want, holder, then one cap per key.
# Grants n = min(want, free slots on every key) on all keys, or nothing when any key is full.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local holder = ARGV[4]
local n = want
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local free = tonumber(ARGV[4 + i]) - redis.call('ZCARD', key)
  if free < n then n = free end
end
if n < 1 then return 0 end
for _, key in ipairs(KEYS) do
  for j = 1, n do
    redis.call('ZADD', key, expiry, holder .. ':' .. j)
  end
  redis.call('EXPIRE', key, math.ceil(expiry - now) + 60)
end
return n
"""


def instance_slot_key(host: str, port: int) -> str:
    return f"{KEY_PREFIX}{host}:{port}"


def slots_in_use(redis, host: str, port: int) -> int:
    """How many connection slots are held right now on one server (expired ones excluded)."""
    key = instance_slot_key(host, port)
    return int(redis.zcount(key, time.time(), "+inf"))


class SlotsUnavailable(Exception):
    pass


class ConnectionSlots:
    """Slots on several instances for one holder (a job); see the module docstring."""

    def __init__(
        self, redis, caps: dict[str, int], *, want: int, holder: str, ttl: float = 60
    ) -> None:
        # caps: {"host:port": max_connections}
        self.redis = redis
        self.caps = {instance_slot_key(*k.rsplit(":", 1)): int(v) for k, v in caps.items()}
        self.want = max(1, int(want))
        self.holder = holder
        self.ttl = ttl
        self.granted = 0
        self._script = redis.register_script(_ACQUIRE)

    def try_acquire(self) -> int:
        """Take up to `want` slots on every instance at once; 0 when one is full."""
        now = time.time()
        keys = list(self.caps)
        args = [now, now + self.ttl, self.want, self.holder, *self.caps.values()]
        self.granted = int(self._script(keys=keys, args=args))
        return self.granted

    def acquire(
        self,
        *,
        wait: float,
        should_cancel: Callable[[], bool] = lambda: False,
        on_wait: Callable[[], None] = lambda: None,
        poll: float = 0.5,
    ) -> int:
        """Block until at least one slot per instance is granted; raise SlotsUnavailable after `wait` s."""
        deadline = time.monotonic() + wait
        while True:
            if self.try_acquire():
                return self.granted
            if should_cancel() or time.monotonic() >= deadline:
                raise SlotsUnavailable(self._busy_message())
            on_wait()
            time.sleep(poll)

    def _busy_message(self) -> str:
        full = [
            key.removeprefix(KEY_PREFIX)
            for key, cap in self.caps.items()
            if self.redis.zcount(key, time.time(), "+inf") >= cap
        ]
        where = ", ".join(full) or "an instance"
        return f"every connection slot of {where} stayed in use by other jobs"

    def refresh(self) -> None:
        """Push the expiry of the held slots forward (call from a heartbeat)."""
        if not self.granted:
            return
        expiry = time.time() + self.ttl
        pipe = self.redis.pipeline()
        for key in self.caps:
            for j in range(1, self.granted + 1):
                pipe.zadd(key, {f"{self.holder}:{j}": expiry}, xx=True)
        pipe.execute()

    def release(self) -> None:
        if not self.granted:
            return
        pipe = self.redis.pipeline()
        for key in self.caps:
            pipe.zrem(key, *[f"{self.holder}:{j}" for j in range(1, self.granted + 1)])
        pipe.execute()
        self.granted = 0

    def __enter__(self) -> ConnectionSlots:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
