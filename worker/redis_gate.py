"""Skipping Redis for a while after it failed: the cache must never slow the service down.

Redis is an accelerator here (read model, rate limits, idempotency
fingerprints), never the record.  After a failure, callers skip Redis for
``retry_after`` seconds, so a dead Redis costs requests nothing; the outage
is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger("worker.redis")

#: after a Redis failure, skip Redis for this long before trying it again (seconds)
REDIS_RETRY_AFTER = 5.0


class RedisGate:
    """Whether Redis may be asked now; callers report each success and failure."""

    def __init__(self, what: str, retry_after: float = REDIS_RETRY_AFTER) -> None:
        self.what = what
        self.retry_after = retry_after
        self.down = False
        self._skip_until = 0.0

    def usable(self) -> bool:
        return not self.down or time.monotonic() >= self._skip_until

    def succeeded(self) -> None:
        if self.down:
            log.info("redis available again", serves=self.what)
            self.down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            log.warning("redis unavailable", serves=self.what, error=str(exc) or type(exc).__name__)
        self.down = True
        self._skip_until = time.monotonic() + self.retry_after
