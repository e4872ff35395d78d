"""The worker pool: N consumer processes, restarted when one dies.

Signals are blocked until the handlers are installed.  SIGTERM or SIGINT
stops the pool: each child cancels its consumers, finishes and acks the
batch it holds, and exits; children still running after
``worker.shutdown_timeout_seconds`` are killed (their unacked messages go
back to the queue, and the inbox absorbs the re-apply).

Exit codes: 0 stopped on a signal, 1 bad configuration or start-up failure,
3 children kept crashing at start (crash loop).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from worker.settings import Settings

log = structlog.get_logger("worker.supervisor")

#: a child that dies sooner than this after start counts as a crash at start
QUICK_DEATH_SECONDS = 5.0
#: consecutive quick deaths after which the pool gives up (exit code 3)
CRASH_LOOP_LIMIT = 10
EXIT_CRASH_LOOP = 3


def _child(
    target: Callable[[Settings, int, threading.Event], None], settings: Settings, index: int, title: str
) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(f"{title} [{index}]")
    except ImportError:  # pragma: no cover - optional
        pass
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    target(settings, index, stop)


class Clock:
    """The pool's time (tests pass one that never sleeps)."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Up to ``seconds``, returning at once when ``event`` is set (by a signal's handler)."""
        return event.wait(seconds)


def run_pool(
    target: Callable[[Settings, int, threading.Event], None],
    settings: Settings,
    processes: int,
    title: str = "orders worker",
    *,
    process: Callable[..., Any] | None = None,
    clock: Clock | None = None,
) -> int:
    """Run ``target(settings, index, stop)`` in ``processes`` children; return an exit code.

    ``process`` makes a child (``multiprocessing``'s fork ``Process`` unless given) and ``clock``
    is the pool's time: both for tests.
    """
    from worker import metrics

    metrics.prepare_multiprocess()  # before any prometheus_client import
    make_process = process or mp.get_context("fork").Process
    clock = clock or Clock()
    stopping = threading.Event()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    children: dict[int, Any] = {}
    started: dict[int, float] = {}
    quick_deaths = 0

    def start(index: int) -> None:
        proc = make_process(target=_child, args=(target, settings, index, title), name=f"{title} {index}")
        proc.start()
        children[index], started[index] = proc, clock.monotonic()
        log.info("worker process started", index=index, pid=proc.pid)

    for i in range(processes):
        start(i)
    try:
        metrics.serve_pool_metrics(settings.metrics.host, settings.metrics.port)
    except OSError as exc:
        log.warning("metrics port unavailable; serving no metrics", port=settings.metrics.port, error=str(exc))
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    code = 0
    while not stopping.is_set():
        clock.wait(stopping, 0.5)
        for index, proc in list(children.items()):
            if proc.is_alive() or stopping.is_set():
                continue
            quick = clock.monotonic() - started[index] < QUICK_DEATH_SECONDS
            quick_deaths = quick_deaths + 1 if quick else 0
            log.warning("worker process died; restarting", index=index, pid=proc.pid, exitcode=proc.exitcode)
            metrics.process_died(proc.pid)
            if quick_deaths >= CRASH_LOOP_LIMIT:
                log.error("worker processes keep dying at start; giving up", deaths=quick_deaths)
                code = EXIT_CRASH_LOOP
                stopping.set()
                break
            clock.sleep(min(0.2 * quick_deaths, 5.0))
            start(index)

    log.info("stopping worker processes", count=len(children))
    for proc in children.values():
        if proc.is_alive():
            proc.terminate()  # SIGTERM
    deadline = clock.monotonic() + settings.worker.shutdown_timeout_seconds
    for proc in children.values():
        proc.join(max(0.0, deadline - clock.monotonic()))
        if proc.is_alive():
            log.warning("worker process did not stop in time; killing", pid=proc.pid)
            proc.kill()
            proc.join()
    return code
