"""``worker.reconnect``: ``Backoff``, ``keep_running`` and ``DatabaseHold``, on a fake clock.

``keep_running`` takes its time from the ``stop`` event it is given (every
wait is ``stop.wait``), so the tests give it a :class:`ClockedStop`: a real
``threading.Event`` whose ``wait`` records the seconds, advances a fake
clock and returns at once.  ``DatabaseHold`` sleeps through the sleep it is
given (the broker's, in the service); here the recording broker's.
Nothing sleeps.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine
from structlog.testing import capture_logs

from tests.unit.recording_broker import RecordingBroker, ScriptedHold
from worker.errors import ConnectionLost, StopRequested
from worker.reconnect import MAX_PROBE_WAIT, Backoff, DatabaseHold, Standby, keep_running


class ClockedStop(threading.Event):
    """A stop event whose ``wait`` is a fake clock: records the wait, advances ``now``, never blocks."""

    def __init__(self, stop_at: float | None = None) -> None:
        super().__init__()
        self.now = 0.0
        self.stop_at = stop_at  # a stop asked for at this time on the clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None, "keep_running never waits without a timeout"
        self.waits.append(timeout)
        self.now += timeout
        if self.stop_at is not None and self.now >= self.stop_at:
            self.set()
        return self.is_set()


class Session:
    """A session that runs ``run`` (raise to lose it) and counts its closes."""

    def __init__(self, run: Callable[[threading.Event], None] = lambda stop: stop.set()) -> None:
        self._run = run
        self.closed = 0

    def run(self, stop: threading.Event) -> None:
        self._run(stop)

    def close(self) -> None:
        self.closed += 1


class Opener:
    """``open_session`` scripted: each call takes the next step (an exception is raised, a session returned)."""

    def __init__(self, *steps: BaseException | Session) -> None:
        self.steps = list(steps)
        self.calls = 0

    def __call__(self) -> Session:
        self.calls += 1
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


def down(n: int) -> list[BaseException]:
    return [ConnectionLost(f"StreamLostError: refused {i}") for i in range(n)]


def lost_after(stop: threading.Event) -> None:
    raise ConnectionLost("StreamLostError: Transport indicated EOF")


def events(logs: list[dict[str, Any]]) -> list[str]:
    return [entry["event"] for entry in logs]


def run(opener: Opener, stop: ClockedStop | None = None, **kw: Any) -> tuple[ClockedStop, list[dict[str, Any]]]:
    stop = stop or ClockedStop()
    with capture_logs() as logs:
        keep_running("commands", opener, stop, **kw)
    return stop, logs


# -- Backoff


def test_backoff_doubles_from_half_a_second_to_ten_and_stays_there() -> None:
    b = Backoff()
    assert [b.next() for _ in range(8)] == [0.5, 1, 2, 4, 8, MAX_PROBE_WAIT, MAX_PROBE_WAIT, MAX_PROBE_WAIT]
    assert MAX_PROBE_WAIT == 10.0


def test_backoff_starts_again_after_a_reset() -> None:
    b = Backoff()
    for _ in range(5):
        b.next()
    b.reset()
    assert [b.next(), b.next()] == [0.5, 1]


def test_backoff_takes_its_own_first_wait_and_cap() -> None:
    b = Backoff(first=0.1, cap=0.3)
    assert [b.next() for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]


# -- keep_running


def test_while_a_dependency_is_down_the_waits_grow_to_ten_seconds() -> None:
    opener = Opener(*down(8), Session())
    stop, logs = run(opener)
    assert stop.waits == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert opener.calls == 9


def test_a_session_that_worked_starts_the_waits_again_from_half_a_second() -> None:
    worked = Session(lost_after)
    opener = Opener(*down(3), worked, *down(2), Session())
    stop, _ = run(opener)
    assert stop.waits == [0.5, 1, 2, 0.5, 1, 2]  # lost after working: 0.5 again, not 4
    assert worked.closed == 1


def test_an_outage_is_logged_once_when_it_goes_and_once_when_it_is_back() -> None:
    _, logs = run(Opener(*down(6), Session(lost_after), *down(4), Session()))
    assert events(logs) == [
        "dependency unavailable, retrying",
        "running again",
        "dependency lost",
        "running again",
    ]
    assert logs[0]["part"] == "commands" and logs[0]["log_level"] == "warning"
    assert logs[0]["error"] == "ConnectionLost: StreamLostError: refused 0"


def test_a_first_start_says_running() -> None:
    _, logs = run(Opener(Session()))
    assert events(logs) == ["running"]


def test_stop_while_down_ends_without_another_attempt() -> None:
    opener = Opener(*down(10))
    stop, _ = run(opener, ClockedStop(stop_at=3.0))  # asked during the third wait (0.5 + 1 + 2)
    assert opener.calls == 3 and stop.waits == [0.5, 1, 2]


def test_a_stop_already_set_opens_nothing() -> None:
    stop = ClockedStop()
    stop.set()
    opener = Opener(Session())
    run(opener, stop)
    assert opener.calls == 0


def test_every_session_is_closed_whatever_its_run_did() -> None:
    sessions = [Session(lost_after), Session(lost_after), Session()]
    run(Opener(*sessions))
    assert [s.closed for s in sessions] == [1, 1, 1]


def test_stopped_during_an_outage_the_held_work_goes_back_and_the_session_is_closed() -> None:
    def held(stop: threading.Event) -> None:
        stop.set()
        raise StopRequested("stopping while the database is unavailable")

    session = Session(held)
    _, logs = run(Opener(session))
    assert session.closed == 1
    assert events(logs) == ["running", "stopped while a dependency was away; held messages go back to the queue"]


def test_standby_waits_as_long_as_it_is_told_and_says_so_once() -> None:
    opener = Opener(*[Standby("another relay is active", 5.0) for _ in range(4)], Session())
    stop, logs = run(opener)
    assert stop.waits == [5.0, 5.0, 5.0, 5.0]
    assert events(logs) == ["standing by", "running again"]


def test_an_error_that_is_not_a_lost_dependency_propagates() -> None:
    with pytest.raises(KeyError):
        run(Opener(KeyError("a bug")))
    session = Session(lambda stop: (_ for _ in ()).throw(ValueError("a bug in run")))
    with pytest.raises(ValueError):
        run(Opener(session))
    assert session.closed == 1


def test_the_caller_says_what_a_lost_dependency_is() -> None:
    # the relay counts any error as lost: it retries with the same growing waits
    opener = Opener(OSError("connection refused"), RuntimeError("outbox query failed"), Session())
    stop, _ = run(opener, lost=(Exception,))
    assert stop.waits == [0.5, 1]


# -- DatabaseHold


def test_the_hold_probes_with_growing_waits_until_the_database_answers() -> None:
    broker = RecordingBroker()
    ticks: list[float] = []
    hold = ScriptedHold(broker, threading.Event(), back_at=30.0, tick=lambda: ticks.append(broker.now))
    with capture_logs() as logs:
        hold.wait(ConnectionLost("x"))
    assert hold.probes == [0.5, 1.5, 3.5, 7.5, 15.5, 25.5, 35.5]  # waits 0.5, 1, 2, 4, 8, 10, 10
    assert ticks == hold.probes  # the liveness file is touched at every probe
    assert events(logs) == ["database unavailable, holding work until it is back", "database available again"]


def test_the_hold_sleeps_in_quarter_seconds_so_heartbeats_keep_flowing() -> None:
    broker = RecordingBroker()
    ScriptedHold(broker, threading.Event(), back_at=3.0).wait(ConnectionLost("x"))
    sleeps = [e.seconds for e in broker.log if e.what == "sleep"]
    assert sleeps and max(sleeps) <= 0.25 and broker.slept == pytest.approx(3.5)


def test_a_stop_during_the_hold_raises_within_a_quarter_second() -> None:
    broker = RecordingBroker()
    stop = threading.Event()
    broker.on_sleep.append(lambda b: stop.set() if b.now >= 4.0 else None)
    hold = ScriptedHold(broker, stop, back_at=None)
    with pytest.raises(StopRequested):
        hold.wait(ConnectionLost("x"))
    assert 4.0 <= broker.now <= 4.25


def test_the_probe_says_no_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg2://orders@127.0.0.1:{port}/orders")
    try:
        assert DatabaseHold(engine, threading.Event(), lambda s: None).answers() is False
    finally:
        engine.dispose()
