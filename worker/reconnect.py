"""Staying connected: the one loop that connects, backs off, logs once and stops cleanly.

Every long-running part of the service (the command consumer, the payment
consumer, the relay) is a *session* opened by :func:`keep_running`: it
connects, runs until asked to stop or until it loses a dependency, and is
closed; a lost dependency is logged once when it goes and once when it is
back, and retried with a growing wait, however long the outage.

:class:`DatabaseHold` is the other half of outage handling: a consumer that
finds PostgreSQL away keeps the messages it holds (unacked) and waits for
the database, instead of cycling every message through the retry tiers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import structlog
from sqlalchemy import Engine, text

from worker.errors import ConnectionLost, StopRequested

log = structlog.get_logger("worker.reconnect")

#: longest wait between two attempts at a dependency that is down (seconds)
MAX_PROBE_WAIT = 10.0


class Backoff:
    """Growing wait that resets once things work again."""

    def __init__(self, first: float = 0.5, cap: float = MAX_PROBE_WAIT) -> None:
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        wait, self.current = self.current, min(self.current * 2, self.cap)
        return wait

    def reset(self) -> None:
        self.current = self.first


class Session(Protocol):
    """One connected stretch of a long-running part."""

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set (then finish what is held) or a dependency is lost (raise)."""

    def close(self) -> None:
        """Release the connections; called once, whatever ``run`` did."""


class Standby(Exception):
    """Raised by an ``open`` that may not run now (another relay is active): wait, then try again."""

    def __init__(self, why: str, wait: float) -> None:
        super().__init__(why)
        self.wait = wait


def keep_running(
    name: str,
    open_session: Callable[[], Session],
    stop: threading.Event,
    lost: tuple[type[BaseException], ...] = (ConnectionLost,),
) -> None:
    """Open sessions one after another until ``stop`` is set.

    ``lost``: the exceptions that mean a dependency went away (logged once,
    retried with :class:`Backoff`); anything else is a bug and propagates.
    """
    backoff = Backoff()
    state = "starting"
    bound = log.bind(part=name)
    while not stop.is_set():
        try:
            session = open_session()
        except Standby as exc:
            if state != "standby":
                bound.info("standing by", why=str(exc))
                state = "standby"
            stop.wait(exc.wait)
            continue
        except lost as exc:
            if state != "down":
                bound.warning("dependency unavailable, retrying", error=f"{type(exc).__name__}: {exc}")
                state = "down"
            stop.wait(backoff.next())
            continue
        if state != "running":
            bound.info("running" if state == "starting" else "running again")
            state = "running"
        backoff.reset()
        try:
            session.run(stop)
        except StopRequested:
            bound.info("stopped while a dependency was away; held messages go back to the queue")
        except lost as exc:
            # unacked messages go back to the queue; the inbox absorbs re-applies
            bound.warning("dependency lost", error=f"{type(exc).__name__}: {exc}")
            state = "down"
            stop.wait(backoff.next())
        finally:
            session.close()


class DatabaseHold:
    """Outage protection: hold the work, probe PostgreSQL with a growing wait, keep heartbeats flowing."""

    def __init__(
        self,
        engine: Engine,
        stop: threading.Event,
        sleep: Callable[[float], None],
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.stop = stop
        self.sleep = sleep  # the broker's sleep: it keeps pika's I/O loop (heartbeats) turning
        self.tick = tick

    def answers(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure: still away
            return False

    def wait(self, exc: BaseException) -> None:
        """Return when the database answers; raise :class:`StopRequested` when asked to stop meanwhile.

        The held messages stay unacked and go back to the queue when the connection closes.
        """
        log.error("database unavailable, holding work until it is back", error=f"{type(exc).__name__}: {exc}")
        backoff = Backoff()
        while True:
            wait = backoff.next()
            while wait > 0:
                if self.stop.is_set():
                    raise StopRequested("stopping while the database is unavailable")
                self.sleep(min(wait, 0.25))
                wait -= 0.25
            self.tick()
            if self.answers():
                log.info("database available again")
                return
