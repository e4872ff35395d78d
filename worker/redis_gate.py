"""Skipping Redis for a while after it failed: the cache must never slow the service down.

Redis is an accelerator here (read model, rate limits, idempotency
fingerprints), never the record.  After a failure, callers skip Redis for
``retry_after`` seconds, so a dead Redis costs requests nothing; the outage
is logged once when it starts and once when it ends, and whoever registered
with :meth:`RedisGate.on_change` (the shim's rate limiter) is told.

A pool whose every connection is in use is not an outage: it raises
:class:`RedisBusy`, which is no ``redis.RedisError``, so no caller mistakes
local overload for a dead Redis and switches Redis off for everyone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("worker.redis")

#: after a Redis failure, skip Redis for this long before trying it again (seconds)
REDIS_RETRY_AFTER = 5.0


class RedisBusy(Exception):
    """Every connection of this process's Redis pool stayed in use: local overload, not an outage."""


class RedisGate:
    """Whether Redis may be asked now; callers report each success and failure."""

    def __init__(self, what: str, retry_after: float = REDIS_RETRY_AFTER) -> None:
        self.what = what
        self.retry_after = retry_after
        self.down = False
        self._skip_until = 0.0
        self._listeners: list[Callable[[bool], None]] = []

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(down)`` each time Redis goes down or comes back."""
        self._listeners.append(listener)

    def usable(self) -> bool:
        return not self.down or time.monotonic() >= self._skip_until

    def succeeded(self) -> None:
        if self.down:
            log.info("redis available again", serves=self.what)
            self.down = False
            self._tell(False)

    def failed(self, exc: BaseException) -> None:
        was_down, self.down = self.down, True
        self._skip_until = time.monotonic() + self.retry_after
        if not was_down:
            log.warning("redis unavailable", serves=self.what, error=str(exc) or type(exc).__name__)
            self._tell(True)

    def _tell(self, down: bool) -> None:
        for listener in self._listeners:
            listener(down)
