"""``worker.supervisor.run_pool``: N children, restarted when one dies, stopped on SIGTERM or SIGINT.

Most tests run the pool in this process with fake children
(:class:`FakeProcess`, made by the ``process`` factory ``run_pool`` takes)
and a fake :class:`Clock`: each turn of the pool's loop is one
``clock.wait``, where the test's script kills a child or sends this process
a real SIGTERM, which the pool's own handler receives.  The pool's signal
handlers and mask are put back after each test.  The last tests run the
real thing: a pool in a forked process with real children and real
signals, well under a second each.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support import wait_until
from worker import metrics, supervisor
from worker.supervisor import CRASH_LOOP_LIMIT, EXIT_CRASH_LOOP, QUICK_DEATH_SECONDS, Clock, run_pool

SHUTDOWN_TIMEOUT = 15.0


class FakeClock(Clock):
    """The pool's time, never sleeping: ``wait`` is one turn of the pool's loop and runs that turn's script."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.turns = 0
        self.sleeps: list[float] = []
        self.script: dict[int, Callable[[], None]] = {}
        #: run at every turn after the scripted ones (a guard, or a crash loop)
        self.every: Callable[[], None] | None = None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def wait(self, event: threading.Event, seconds: float) -> bool:
        self.turns += 1
        assert self.turns < 200, "the pool never stopped"
        self.now += seconds
        if self.turns in self.script:
            self.script[self.turns]()
        elif self.every is not None:
            self.every()
        return event.is_set()

    def at(self, turn: int, action: Callable[[], None]) -> None:
        self.script[turn] = action

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    """A child as ``multiprocessing.Process`` is one: started, alive until it dies or stops on SIGTERM."""

    pids = itertools.count(70_001)

    def __init__(self, pool: Pool, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        self.pool, self.target, self.args, self.name = pool, target, args, name
        self.pid: int | None = None
        self.exitcode: int | None = None
        #: seconds it takes to stop after SIGTERM (None: never; it has to be killed)
        self.stops_in: float | None = 0.5
        self.terminated = self.killed = False
        self.joins: list[float | None] = []

    @property
    def index(self) -> int:
        return self.args[2]

    def start(self) -> None:
        self.pid = next(self.pids)
        self.pool.started.append(self)

    def is_alive(self) -> bool:
        return self.pid is not None and self.exitcode is None

    def die(self, code: int = 1) -> None:
        self.exitcode = code

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.killed = True
        self.die(-signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        self.joins.append(timeout)
        if not self.is_alive():
            return
        if self.terminated and self.stops_in is not None and (timeout is None or self.stops_in <= timeout):
            self.pool.clock.advance(self.stops_in)
            self.die(0)
        elif timeout is not None:
            self.pool.clock.advance(timeout)


class Pool:
    """One ``run_pool`` over fake children; ``run()`` returns its exit code."""

    def __init__(self, processes: int = 2) -> None:
        self.processes = processes
        self.clock = FakeClock()
        self.started: list[FakeProcess] = []
        self.deaths_reported: list[int] = []
        #: the indexes whose children do not stop on SIGTERM
        self.deaf: set[int] = set()
        self.settings = SimpleNamespace(
            metrics=SimpleNamespace(host="127.0.0.1", port=0),
            worker=SimpleNamespace(shutdown_timeout_seconds=SHUTDOWN_TIMEOUT),
        )

    def process(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> FakeProcess:
        child = FakeProcess(self, target, args, name)
        if child.index in self.deaf:
            child.stops_in = None
        return child

    def live(self, index: int) -> FakeProcess:
        """The child now running at ``index``."""
        return [p for p in self.started if p.index == index][-1]

    def run(self) -> int:
        return run_pool(
            target,
            self.settings,  # type: ignore[arg-type]
            self.processes,
            "orders worker",
            process=self.process,
            clock=self.clock,
        )


def target(settings: Any, index: int, stop: threading.Event) -> None:
    """What a child runs (never run here: the children are fake)."""


def sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # received by the pool's own handler


@pytest.fixture(autouse=True)
def own_signals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The pool's signal handlers and mask go; its metrics bookkeeping stays in this test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    monkeypatch.setattr(metrics, "prepare_multiprocess", lambda: str(tmp_path))
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Pool:
    p = Pool()
    monkeypatch.setattr(metrics, "process_died", p.deaths_reported.append)
    return p


def test_each_child_is_started_with_its_index_and_sigterm_is_forwarded_to_each(pool: Pool) -> None:
    pool.processes = 3
    pool.clock.at(2, sigterm)
    assert pool.run() == 0
    assert [(p.index, p.name, p.target) for p in pool.started] == [
        (0, "orders worker 0", supervisor._child),
        (1, "orders worker 1", supervisor._child),
        (2, "orders worker 2", supervisor._child),
    ]
    assert all(p.args[0] is target and p.args[1] is pool.settings for p in pool.started)
    assert all(p.terminated and not p.killed and p.exitcode == 0 for p in pool.started)
    assert pool.clock.turns == 2  # the signal ends the loop at once


def test_sigint_stops_the_pool_as_sigterm_does(pool: Pool) -> None:
    pool.clock.at(1, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert pool.run() == 0
    assert all(p.terminated for p in pool.started)


def test_a_child_that_dies_is_restarted_at_its_index(pool: Pool) -> None:
    def crash() -> None:
        pool.clock.advance(QUICK_DEATH_SECONDS + 60)  # after a long run
        pool.live(1).die(-signal.SIGKILL)

    pool.clock.at(1, crash)
    pool.clock.at(3, sigterm)
    assert pool.run() == 0
    assert [p.index for p in pool.started] == [0, 1, 1]
    dead, replacement = pool.started[1], pool.started[2]
    assert pool.deaths_reported == [dead.pid]  # its live gauges forgotten
    assert not dead.terminated and replacement.terminated
    assert pool.clock.sleeps == [0.0]  # no pause after a death that was no crash at start


def test_a_quick_death_pauses_a_little_longer_each_time_before_the_restart(pool: Pool) -> None:
    for turn in (1, 2, 3):
        pool.clock.at(turn, lambda: pool.live(0).die(1))
    pool.clock.at(4, sigterm)
    assert pool.run() == 0
    assert [p.index for p in pool.started] == [0, 1, 0, 0, 0]
    assert pool.clock.sleeps == pytest.approx([0.2, 0.4, 0.6])


def test_children_that_keep_dying_at_start_stop_the_pool_with_exit_code_3(pool: Pool) -> None:
    pool.clock.every = lambda: pool.live(0).die(1)
    assert pool.run() == EXIT_CRASH_LOOP
    assert len([p for p in pool.started if p.index == 0]) == CRASH_LOOP_LIMIT  # the first and 9 restarts
    assert pool.clock.sleeps == pytest.approx([0.2 * n for n in range(1, CRASH_LOOP_LIMIT)])
    assert pool.live(1).terminated and pool.live(1).exitcode == 0  # the others are stopped


def test_a_child_still_running_after_the_shutdown_timeout_is_killed(pool: Pool) -> None:
    pool.clock.at(1, sigterm)
    pool.deaf = {1}
    assert pool.run() == 0
    polite, hung = pool.started
    assert polite.joins == [SHUTDOWN_TIMEOUT] and polite.exitcode == 0 and not polite.killed
    # the deadline is shared: the second gets what the first left of it, then the kill
    assert hung.joins == [pytest.approx(SHUTDOWN_TIMEOUT - polite.stops_in), None]
    assert hung.terminated and hung.killed


def test_a_child_that_dies_while_the_pool_stops_is_not_restarted(pool: Pool) -> None:
    def both() -> None:
        pool.live(0).die(1)
        sigterm()

    pool.clock.at(1, both)
    assert pool.run() == 0
    assert len(pool.started) == 2 and pool.deaths_reported == []
    assert not pool.started[0].terminated  # nothing sent to a dead child


# -- the real thing: a forked pool, real children, real signals


class BriskClock(Clock):
    """Real time, the loop turning every 50 ms instead of 500 (a signal ends a wait at once either way)."""

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(min(seconds, 0.05))


def child_target(settings: Any, index: int, stop: threading.Event) -> None:
    """A real child: says it started, waits for its stop, says it stopped."""
    folder = Path(settings.folder)
    (folder / f"started-{index}-{os.getpid()}").touch()
    if stop.wait(10):
        (folder / f"stopped-{index}-{os.getpid()}").touch()


def real_pool(folder: Path, processes: int) -> None:
    os.setpgid(0, 0)  # a group of its own, as `orders worker` in a terminal: a Ctrl-C reaches every member
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder / "metrics")
    settings = SimpleNamespace(
        folder=str(folder),
        metrics=SimpleNamespace(host="127.0.0.1", port=0),
        worker=SimpleNamespace(shutdown_timeout_seconds=5),
    )
    sys.exit(run_pool(child_target, settings, processes, clock=BriskClock()))  # type: ignore[arg-type]


def marks(folder: Path, what: str) -> list[tuple[int, int]]:
    """(index, pid) of each child that left this mark."""
    return sorted((int(p.name.split("-")[1]), int(p.name.split("-")[2])) for p in folder.glob(f"{what}-*"))


@pytest.fixture
def forked_pool(tmp_path: Path) -> Iterator[Callable[[int], Any]]:
    started: list[Any] = []

    def start(processes: int) -> Any:
        proc = mp.get_context("fork").Process(target=real_pool, args=(tmp_path, processes))
        proc.start()
        started.append(proc)
        wait_until(lambda: os.getpgid(proc.pid) == proc.pid, 5, 0.005, "the pool's own process group")
        return proc

    yield start
    for proc in started:  # whatever the test did, nothing of the pool is left running
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.join(5)


def started_children(folder: Path, count: int) -> list[tuple[int, int]]:
    return wait_until(lambda: len(marks(folder, "started")) == count and marks(folder, "started"), 10, 0.01)


def test_a_real_pool_stops_on_ctrl_c_its_children_through_the_forwarded_sigterm(tmp_path: Path, forked_pool) -> None:
    proc = forked_pool(2)
    children = started_children(tmp_path, 2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the pool and its children all get SIGINT
    proc.join(5)
    assert proc.exitcode == 0
    assert marks(tmp_path, "stopped") == children  # each ended on its stop event: SIGINT ignored, SIGTERM taken


def test_a_real_child_that_dies_is_started_again(tmp_path: Path, forked_pool) -> None:
    proc = forked_pool(1)
    ((_, first),) = started_children(tmp_path, 1)
    os.kill(first, signal.SIGKILL)
    restarted = started_children(tmp_path, 2)
    assert [index for index, _ in restarted] == [0, 0]
    os.kill(proc.pid, signal.SIGTERM)  # to the pool alone: it forwards it
    proc.join(5)
    assert proc.exitcode == 0
    assert marks(tmp_path, "stopped") == [(0, pid) for _, pid in restarted if pid != first]
