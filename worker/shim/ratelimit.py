"""Rate limits: per user and per client address, for placing and reading; per client address for
the payment webhook (its callers have no token).

In Redis, shared by every shim process: one Lua script checks every key of
a request and increments them only when all have room, so concurrent
requests can never overshoot a limit (Redis runs a script atomically).
Windows are fixed, 60 s from a key's first hit.

Redis unreachable → the limits stay on, enforced in each process by
:class:`LocalLimiter` (token buckets holding that process's share: the
configured limit divided by the number of shim processes).  Abuse and
overload are exactly when limits matter; switching them off when Redis is
gone would hand the service to whoever sends most.  Each bucket starts
from what its key had left in Redis when this process last counted it there
(every answer from Redis says so), so an outage hands no client a fresh
limit; a key this process never counted starts with its whole share, as a
key Redis has no count for would.  The switch is logged
once each way, shown on ``/readyz`` and in ``orders_shim_ratelimit_mode``,
and each decision made locally is counted in
``orders_shim_ratelimit_unavailable_total``.  While Redis is down it is not
asked for a few seconds at a time (:class:`~worker.redis_gate.RedisGate`),
so a dead Redis costs requests nothing.

A Redis pool with every connection in use is no outage: it raises
:class:`~worker.redis_gate.RedisBusy`, which is left to propagate (the
request is shed with 503), and the limits stay in Redis for everyone else.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import redis
import redis.asyncio as aioredis
import structlog

from worker.redis_gate import RedisGate

WINDOW_SECONDS = 60
KEY_PREFIX = "orders:rl:"

# KEYS: counters; ARGV: their limits, then the window in ms.
# Returns {allowed (1/0), remaining, ms until the binding window ends, limit, count of each key after this
# request}: the counts let the process remember where each key stood, for when Redis cannot be asked.
_CHECK_AND_COUNT = """
local window = tonumber(ARGV[#ARGV])
local counts, ttls = {}, {}
local refused = nil
for i, key in ipairs(KEYS) do
  counts[i] = tonumber(redis.call('GET', key) or '0')
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then ttl = window end
  ttls[i] = ttl
  if refused == nil and counts[i] >= tonumber(ARGV[i]) then refused = i end
end
if refused ~= nil then
  local out = {0, 0, ttls[refused], tonumber(ARGV[refused])}
  for i = 1, #KEYS do out[4 + i] = counts[i] end
  return out
end
local remaining, reset, limit = nil, 0, 0
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[i])
  if remaining == nil or cap - counts[i] - 1 < remaining then remaining, reset, limit = cap - counts[i] - 1, ttls[i], cap end
  counts[i] = redis.call('INCR', key)
  if counts[i] == 1 then redis.call('PEXPIRE', key, window) end
end
local out = {1, remaining, reset, limit}
for i = 1, #KEYS do out[4 + i] = counts[i] end
return out
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        """IETF draft RateLimit headers (and Retry-After when refused)."""
        h = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
            "RateLimit-Policy": f"{self.limit};w={WINDOW_SECONDS}",
        }
        if not self.allowed:
            h["Retry-After"] = str(max(1, self.reset_seconds))
        return h


Mode = Literal["redis", "local"]
log = structlog.get_logger("worker.shim")

#: buckets one process keeps at most; beyond it the least recently used is dropped (it starts with its
#: whole share again), so a flood of distinct users or addresses cannot exhaust memory
LOCAL_MAX_BUCKETS = 100_000

#: per kind: (limit per user, or None where callers have no user; limit per client address), per minute
Limits = dict[str, tuple[int | None, int]]


def share(limit: int, processes: int) -> int:
    """One process's part of ``limit`` (at least 1: a tiny limit must not refuse everything)."""
    return max(1, limit // processes)


def _counted(limits: Limits, kind: str, user: str | None, address: str) -> list[tuple[str, int]]:
    """(key, limit) of every counter a request of ``kind`` counts against."""
    per_user, per_address = limits[kind]
    keys = [(f"{kind}:a:{address}", per_address)]
    if per_user is not None and user is not None:
        keys.insert(0, (f"{kind}:u:{user}", per_user))
    return keys


class LocalLimiter:
    """Token buckets of one process: the limits while Redis cannot be asked.

    Each bucket holds up to this process's share of a limit and refills at
    that share per :data:`WINDOW_SECONDS`: a burst beyond the share is
    refused at once, and a steady client gets its share per minute.  While
    Redis answers, :meth:`remember` sets a key's bucket to the part of its
    share that its count in Redis leaves (a client that spent its limit
    there has nothing here either); a key never counted here starts with its
    whole share.  A check never awaits, so checking every key and taking from
    all of them is atomic on the event loop.
    """

    def __init__(self, limits: Limits, processes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.processes = processes
        self.clock = clock
        self._limits = limits
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, as of)

    def check(self, kind: str, user: str | None, address: str) -> Decision:
        now = self.clock()
        counted = [(key, share(limit, self.processes)) for key, limit in _counted(self._limits, kind, user, address)]
        levels = [self._level(key, cap, now) for key, cap in counted]
        for tokens, (_key, cap) in zip(levels, counted):
            if tokens < 1:
                return Decision(False, cap, 0, _seconds((1 - tokens) * WINDOW_SECONDS / cap))
        for (key, _cap), tokens in zip(counted, levels):
            self._set(key, tokens - 1, now)
        left, cap = min((tokens - 1, cap) for tokens, (_key, cap) in zip(levels, counted))
        return Decision(True, cap, math.floor(left), _seconds((cap - left) * WINDOW_SECONDS / cap))

    def remember(self, kind: str, user: str | None, address: str, counts: list[int]) -> None:
        """Where each key of a request stands in Redis (its count in the current window), as buckets."""
        now = self.clock()
        for (key, limit), count in zip(_counted(self._limits, kind, user, address), counts):
            self._set(key, share(limit, self.processes) * max(0, limit - count) / limit, now)

    def _set(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > LOCAL_MAX_BUCKETS:
            self._buckets.popitem(last=False)

    def _level(self, key: str, cap: int, now: float) -> float:
        tokens, then = self._buckets.get(key, (cap, now))
        return min(cap, tokens + (now - then) * cap / WINDOW_SECONDS)


def _seconds(s: float) -> int:
    return max(1, math.ceil(s - 1e-9))


class RateLimiter:
    """Counts requests per (kind, user) and (kind, address): in Redis, or in-process while it is down."""

    def __init__(
        self,
        client: aioredis.Redis,
        limits: Limits,
        metrics: object = None,
        gate: RedisGate | None = None,
        processes: int = 1,
    ) -> None:
        """``limits``: kind (``place``/``read``/``webhook``) → (per user or None, per address) per minute;
        ``processes``: how many shim processes share them when Redis is unreachable."""
        self._script = client.register_script(_CHECK_AND_COUNT)
        self._limits = limits
        self._metrics = metrics
        self._gate = gate or RedisGate("rate limits")
        self.local = LocalLimiter(limits, processes)
        self._gate.on_change(self._switched)
        self._show_mode()

    @property
    def mode(self) -> Mode:
        """Where limits are enforced now."""
        return "local" if self._gate.down else "redis"

    async def check(self, kind: str, user: str | None, address: str) -> Decision:
        """The decision for one request (``user`` None: counted per address only).

        Raises :class:`~worker.redis_gate.RedisBusy` when no Redis connection
        came free in time (the caller sheds the request).
        """
        if self._gate.usable():
            try:
                return await self._in_redis(kind, user, address)
            except redis.RedisError as exc:
                self._gate.failed(exc)
        if self._metrics is not None:
            self._metrics.ratelimit_unavailable.inc()  # type: ignore[attr-defined]
        return self.local.check(kind, user, address)

    async def _in_redis(self, kind: str, user: str | None, address: str) -> Decision:
        counted = _counted(self._limits, kind, user, address)
        allowed, remaining, reset_ms, limit, *counts = await self._script(
            keys=[KEY_PREFIX + key for key, _ in counted],
            args=[*(limit for _, limit in counted), WINDOW_SECONDS * 1000],
        )
        self._gate.succeeded()
        self.local.remember(kind, user, address, [int(c) for c in counts])
        return Decision(bool(allowed), int(limit), max(0, int(remaining)), -(-int(reset_ms) // 1000))

    def _switched(self, down: bool) -> None:
        if down:
            log.warning("rate limits enforced in-process while redis is unreachable", share_of=self.local.processes)
        else:
            log.info("rate limits enforced in redis again")
        self._show_mode()

    def _show_mode(self) -> None:
        if self._metrics is not None:
            for mode in ("redis", "local"):
                self._metrics.ratelimit_mode.labels(mode).set(int(mode == self.mode))  # type: ignore[attr-defined]
