"""Rate limits: per user and per client address, for placing and reading.

In Redis, shared by every shim process: one Lua script checks every key of
a request and increments them only when all have room, so concurrent
requests can never overshoot a limit (Redis runs a script atomically).
Windows are fixed, 60 s from a key's first hit.

Redis unreachable → the limits stay on, enforced in each process by
:class:`LocalLimiter` (token buckets holding that process's share: the
configured limit divided by the number of shim processes).  Abuse and
overload are exactly when limits matter; switching them off when Redis is
gone would hand the service to whoever sends most.  The switch is logged
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
# Returns {allowed (1/0), remaining, ms until the binding window ends, limit}.
_CHECK_AND_COUNT = """
local window = tonumber(ARGV[#ARGV])
local remaining, reset, limit = nil, 0, 0
for i, key in ipairs(KEYS) do
  local n = tonumber(redis.call('GET', key) or '0')
  local cap = tonumber(ARGV[i])
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then ttl = window end
  if n >= cap then return {0, 0, ttl, cap} end
  if remaining == nil or cap - n - 1 < remaining then remaining, reset, limit = cap - n - 1, ttl, cap end
end
for i, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('PEXPIRE', key, window) end
end
return {1, remaining, reset, limit}
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

#: buckets one process keeps at most while Redis is unreachable; beyond it the least recently used
#: is dropped (it starts full again), so a flood of distinct users or addresses cannot exhaust memory
LOCAL_MAX_BUCKETS = 100_000


def share(limit: int, processes: int) -> int:
    """One process's part of ``limit`` (at least 1: a tiny limit must not refuse everything)."""
    return max(1, limit // processes)


class LocalLimiter:
    """Token buckets of one process: the limits while Redis cannot be asked.

    Each bucket holds up to this process's share of a limit and refills at
    that share per :data:`WINDOW_SECONDS`: a burst beyond the share is
    refused at once, and a steady client gets its share per minute.  A check
    never awaits, so checking both keys and taking from both is atomic on
    the event loop.
    """

    def __init__(
        self, limits: dict[str, tuple[int, int]], processes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.processes = processes
        self.clock = clock
        self._caps = {kind: (share(u, processes), share(a, processes)) for kind, (u, a) in limits.items()}
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, as of)

    def check(self, kind: str, user: str, address: str) -> Decision:
        now = self.clock()
        keys = (f"{kind}:u:{user}", f"{kind}:a:{address}")
        caps = self._caps[kind]
        levels = [self._level(key, cap, now) for key, cap in zip(keys, caps)]
        for tokens, cap in zip(levels, caps):
            if tokens < 1:
                return Decision(False, cap, 0, _seconds((1 - tokens) * WINDOW_SECONDS / cap))
        for key, tokens in zip(keys, levels):
            self._buckets[key] = (tokens - 1, now)
            self._buckets.move_to_end(key)
        while len(self._buckets) > LOCAL_MAX_BUCKETS:
            self._buckets.popitem(last=False)
        left, cap = min((tokens - 1, cap) for tokens, cap in zip(levels, caps))
        return Decision(True, cap, math.floor(left), _seconds((cap - left) * WINDOW_SECONDS / cap))

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
        limits: dict[str, tuple[int, int]],
        metrics: object = None,
        gate: RedisGate | None = None,
        processes: int = 1,
    ) -> None:
        """``limits``: kind (``place``/``read``) → (per user, per address) per minute;
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

    async def check(self, kind: str, user: str, address: str) -> Decision:
        """The decision for one request.

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

    async def _in_redis(self, kind: str, user: str, address: str) -> Decision:
        per_user, per_address = self._limits[kind]
        keys = [f"{KEY_PREFIX}{kind}:u:{user}", f"{KEY_PREFIX}{kind}:a:{address}"]
        allowed, remaining, reset_ms, limit = await self._script(
            keys=keys, args=[per_user, per_address, WINDOW_SECONDS * 1000]
        )
        self._gate.succeeded()
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
