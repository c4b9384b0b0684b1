"""The two-phase cut of a fanned-out `locked` (or `cold`) backup, over Redis lists.

One owner holds the global read lock; the parts (one per instance, often in other
processes on other hosts) hold the dump connections. The cut, round by round:

    part                                     owner
    connect, describe, open connections
    "ready" r  ------------------------->    waits for every part's "ready" r
                                             FLUSH TABLES WITH READ LOCK everywhere
               <-------------------------    "go" r
    START TRANSACTION WITH CONSISTENT
    SNAPSHOT on each connection, read
    the binlog coordinates
    "open" r (coordinates)  ------------>    waits for every "open" r (open_timeout)
                                             UNLOCK TABLES (cold: after the dump)
               <-------------------------    "cut" r (the consistent instant)
    dump

A part missing its "open" within `open_timeout` fails the round: the owner unlocks and
says "retry" r+1 (parts that opened roll back and report "ready" again), up to
`retries` times, then the cut fails naming the part. A part that cannot go on says
"failed" and the owner stops at once. Only the owner decides, so a late message of an
old round is ignored. Nothing here knows Django or RQ: `redis` is anything with
`rpush`, `blpop` and `expire` (redis-py), `key(*suffix)` names the keys.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from backups.engine.errors import Cancelled, EngineError

POLL_SECONDS = 0.25  # how often a waiting side checks `should_stop`
KEY_TTL_SECONDS = 24 * 3600


class CutFailed(EngineError):
    """The cut could not be taken; the message names the part to blame."""

    def __init__(self, message: str, *, part: str = "") -> None:
        super().__init__(message)
        self.part = part


class _Missed(CutFailed):
    """A part did not answer within the time allowed (the owner may retry the round)."""


@dataclass
class _Channel:
    redis: object
    key: Callable[..., str]

    def send(self, box: str, message: dict) -> None:
        name = self.key("cut", box)
        pipe = self.redis.pipeline()
        pipe.rpush(name, json.dumps(message))
        pipe.expire(name, KEY_TTL_SECONDS)
        pipe.execute()

    def receive(self, box: str, timeout: float) -> dict | None:
        # BLPOP takes whole seconds on old servers; fractions work on Redis >= 6.
        got = self.redis.blpop([self.key("cut", box)], timeout=max(0.01, timeout))
        if not got:
            return None
        return json.loads(got[1])


class OwnerCut:
    """The owner's side: `take(...)` runs the rounds around a lock it is given."""

    def __init__(self, redis, key: Callable[..., str], parts: Iterable[str]) -> None:
        self.channel = _Channel(redis, key)
        self.parts = list(parts)
        self.round = 0
        self.coordinates: dict[str, dict] = {}
        self.consistent_at: datetime | None = None

    def tell(self, say: str, **extra) -> None:
        for part in self.parts:
            self.channel.send(f"to:{part}", {"say": say, "round": self.round, **extra})

    def wait_all(self, state: str, timeout: float, should_stop: Callable[[], bool]) -> dict:
        """Every part's message `state` of this round (part -> message), or CutFailed
        naming the parts still missing after `timeout` s, or the part that gave up."""
        got: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.parts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [p for p in self.parts if p not in got]
                raise _Missed(
                    f"part {', '.join(missing)} did not report {state} within {timeout:g} s",
                    part=", ".join(missing),
                )
            if should_stop():
                raise Cancelled("backup cancelled while taking the cut")
            message = self.channel.receive("owner", min(POLL_SECONDS, remaining))
            if message is None:
                continue
            if message.get("state") == "failed":
                part = message.get("part", "?")
                raise CutFailed(
                    f"part {part} could not take part in the cut: {message.get('reason', '')}",
                    part=part,
                )
            if message.get("round") == self.round and message.get("state") == state:
                got[message["part"]] = message
        return got

    def take(
        self,
        *,
        lock_acquire: Callable[[], None],
        lock_release: Callable[[], None],
        ready_timeout: float,
        open_timeout: float,
        retries: int,
        should_stop: Callable[[], bool],
        hold: bool = False,
        now: Callable[[], datetime],
    ) -> dict[str, dict]:
        """Take the cut; returns each part's coordinates (as the part reported them).

        The lock is released before returning unless `hold` (cold: the caller releases it
        after the dump). On any failure the lock is released and every part told "fail".
        """
        try:
            try:
                self.wait_all("ready", ready_timeout, should_stop)
            except _Missed as exc:
                raise CutFailed(
                    f"part {exc.part} did not report ready within {ready_timeout:g} s (no "
                    "worker took it, or it could not connect and describe its shards)",
                    part=exc.part,
                ) from None
            while True:
                lock_acquire()
                self.tell("go")
                try:
                    opened = self.wait_all("open", open_timeout, should_stop)
                except _Missed as exc:
                    lock_release()
                    if self.round >= retries:
                        attempts = self.round + 1
                        raise CutFailed(
                            f"part {exc.part} did not open its snapshot within {open_timeout:g} s"
                            f" while the global read lock was held ({attempts} attempt"
                            f"{'s' if attempts > 1 else ''})",
                            part=exc.part,
                        ) from None
                    self.round += 1
                    self.tell("retry")
                    # The late part may still be opening: it reports ready once it saw the retry.
                    self.wait_all("ready", ready_timeout, should_stop)
                    continue
                self.consistent_at = now()
                if not hold:
                    lock_release()
                self.tell("cut", at=self.consistent_at.isoformat())
                self.coordinates = {p: m.get("coordinates", {}) for p, m in opened.items()}
                return self.coordinates
        except BaseException as exc:
            lock_release()
            try:
                self.tell("fail", reason=str(exc) or exc.__class__.__name__)
            except Exception:  # noqa: BLE001 - parts also see the owner's abort
                pass
            raise


class PartCut:
    """A part's side: `take(open_snapshot, rollback, should_stop)` returns its coordinates
    and the owner's consistent instant once the owner confirmed the cut."""

    def __init__(self, redis, key: Callable[..., str], part: str) -> None:
        self.channel = _Channel(redis, key)
        self.part = part

    def _say(self, state: str, round_: int, **extra) -> None:
        self.channel.send("owner", {"part": self.part, "state": state, "round": round_, **extra})

    def fail(self, reason: str) -> None:
        """Tell the owner this part cannot take part (best effort)."""
        try:
            self._say("failed", -1, reason=reason[:500])
        except Exception:  # noqa: BLE001 - the owner sees the part's outcome instead
            pass

    def take(
        self,
        *,
        open_snapshot: Callable[[], dict],
        rollback: Callable[[], None],
        should_stop: Callable[[], bool],
    ) -> tuple[dict, str]:
        round_ = 0
        opened: dict | None = None
        self._say("ready", round_)
        while True:
            if should_stop():
                raise Cancelled("backup cancelled while taking the cut")
            message = self.channel.receive(f"to:{self.part}", POLL_SECONDS)
            if message is None:
                continue
            say, at_round = message.get("say"), message.get("round")
            if say == "fail":
                raise CutFailed(f"the cut failed: {message.get('reason', '')}", part=self.part)
            if say == "retry":
                if opened is not None:
                    rollback()
                    opened = None
                round_ = int(at_round)
                self._say("ready", round_)
            elif say == "go" and at_round == round_ and opened is None:
                opened = open_snapshot()
                self._say("open", round_, coordinates=opened)
            elif say == "cut" and at_round == round_ and opened is not None:
                return opened, str(message.get("at") or "")
