"""Rate limits in Redis: per user and per client address, for placing and reading.

One Lua script checks every key of a request and increments them only when
all have room, so concurrent requests can never overshoot a limit (Redis
runs a script atomically).  Windows are fixed, 60 s from a key's first hit.

Redis down → fail open: the request is served, the outage is logged once per
change of state (down, then up again) and counted in
``orders_shim_ratelimit_unavailable_total``.  Rate limits protect capacity;
refusing every order because the limiter's store is down would turn a cache
outage into a full outage.  For the next few seconds Redis is not asked at
all, so a dead Redis costs requests nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

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
        h = {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
             "RateLimit-Reset": str(self.reset_seconds), "RateLimit-Policy": f"{self.limit};w={WINDOW_SECONDS}"}
        if not self.allowed:
            h["Retry-After"] = str(max(1, self.reset_seconds))
        return h


class RateLimiter:
    """Counts requests per (kind, user) and (kind, address) in Redis."""

    def __init__(self, client: aioredis.Redis, limits: dict[str, tuple[int, int]], metrics: object = None,
                 gate: RedisGate | None = None) -> None:
        """``limits``: kind (``place``/``read``) → (per user, per address) per minute."""
        self._script = client.register_script(_CHECK_AND_COUNT)
        self._limits = limits
        self._metrics = metrics
        self._gate = gate or RedisGate("rate limits")

    async def check(self, kind: str, user: str, address: str) -> Decision | None:
        """A decision, or None when Redis cannot be asked (the request is served)."""
        per_user, per_address = self._limits[kind]
        if not self._gate.usable():
            self._count_unavailable()
            return None
        keys = [f"{KEY_PREFIX}{kind}:u:{user}", f"{KEY_PREFIX}{kind}:a:{address}"]
        try:
            allowed, remaining, reset_ms, limit = await self._script(
                keys=keys, args=[per_user, per_address, WINDOW_SECONDS * 1000])
        except redis.RedisError as exc:
            self._gate.failed(exc)
            self._count_unavailable()
            return None
        self._gate.succeeded()
        return Decision(bool(allowed), int(limit), max(0, int(remaining)), -(-int(reset_ms) // 1000))

    def _count_unavailable(self) -> None:
        if self._metrics is not None:
            self._metrics.ratelimit_unavailable.inc()  # type: ignore[attr-defined]
