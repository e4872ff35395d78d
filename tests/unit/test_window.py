"""``worker.consume.Window``, the payment strategy: up to N steps in flight, each acked when it is done.

Against the recording broker, a real thread pool and a payment step whose
provider calls the test lets finish one at a time (``GatedStep``).  The
tests say what RabbitMQ sees, not how the window keeps its books: what is
held (unacked) while its step runs, that a step that finishes is settled
and acked though an earlier one is still running, that a database outage
holds the step's message (no retry tier spent) until PostgreSQL is back,
and what a stop does to the work in flight (``join`` finishes and acks it,
``abandon`` lets it end and acks nothing).  Only :func:`window` and
:class:`GatedStep` know how a window is built and called.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import psycopg2
import pytest

from handlers.errors import RetryLater
from handlers.outcome import Outcome
from schema.topology import DELAY_EXCHANGE
from tests.unit.recording_broker import RecordingBroker, ScriptedHold, delivery
from tests.unit.test_errors import wrapped
from worker.consume import Window, _Session
from worker.errors import ConnectionLost, StopRequested
from worker.handled import Handled, Result, handled_from
from worker.rabbit.connection import Delivery

ORDER = "5b0c6f8e-4c8e-4a57-9d1e-2f1f1f1f1f1f"
#: real seconds a step waits for the test to let it finish before it is taken for a hang
GATE_SECONDS = 5.0


def down() -> Exception:
    return wrapped(psycopg2.OperationalError("server closed the connection unexpectedly"))


class GatedStep:
    """A payment step whose calls finish when the test says (``release``); what each returns is scripted."""

    def __init__(self) -> None:
        self._gates: dict[str, threading.Event] = {}
        self._scripts: dict[str, list[Callable[[Delivery], Handled]]] = {}
        self._lock = threading.Lock()
        self.calls: list[str] = []
        #: every delivery handed to the step, as it was handed
        self.seen: list[Delivery] = []
        self.finished: list[str] = []

    def hold_back(self, *message_ids: str) -> None:
        for mid in message_ids:
            self._gates[mid] = threading.Event()

    def release(self, *message_ids: str) -> None:
        for mid in message_ids:
            self._gates[mid].set()

    def script(self, message_id: str, *results: Callable[[Delivery], Handled]) -> None:
        self._scripts[message_id] = list(results)

    def handle_batch(
        self, batch: list[Delivery], report: Callable[[list[Handled]], None] | None = None
    ) -> list[Handled]:
        done = []
        for d in batch:
            h = self.handle(d)
            done.append(h)
            if report is not None:
                report([h])
        return done

    def handle(self, d: Delivery) -> Handled:
        mid = d.message_id or ""
        with self._lock:
            self.calls.append(mid)
            self.seen.append(d)
            script = self._scripts.get(mid)
            result = script.pop(0) if script else None
        gate = self._gates.get(mid)
        if gate is not None and not gate.wait(GATE_SECONDS):
            raise AssertionError(f"step {mid} was never released")
        with self._lock:
            self.finished.append(mid)
        if result is not None:
            return result(d)
        return Handled(d, Result.APPLIED, Outcome("applied", ORDER, status="paid"), order_id=ORDER)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4, thread_name_prefix="payment") as executor:
        yield executor


def window(
    pool: ThreadPoolExecutor,
    step: GatedStep,
    broker: RecordingBroker,
    size: int = 3,
    stop: threading.Event | None = None,
    back_at: float | None = 0.0,
    batch_size: int = 1,
    slots: int | None = None,
) -> tuple[Window, ScriptedHold]:
    """A window over ``step`` (batches of ``batch_size``, ``slots`` of them at once); PostgreSQL answers its
    probe from ``back_at`` on the broker's clock."""
    from worker.settlement import Settlement

    hold = ScriptedHold(broker, stop or threading.Event(), back_at)
    w = Window(pool, step, hold, Settlement((1, 2)), size, batch_size=batch_size, slots=slots)  # type: ignore[arg-type]
    return w, hold


def steps(*tags: int) -> list[Delivery]:
    return [
        delivery(tag, "StartPayment", b"{}", queue="orders.payments", exchange="orders.internal", routing_key="start")
        for tag in tags
    ]


def submit(w: Window, broker: RecordingBroker, deliveries: list[Delivery]) -> None:
    broker.taken(deliveries)
    w.submit(broker, deliveries)


def poll_until(w: Window, broker: RecordingBroker, done: Callable[[], bool]) -> None:
    """Poll as the consumer does (a poll, a sleep that keeps heartbeats) until ``done``."""
    while True:
        w.poll(broker)
        if done():
            return
        broker.sleep(0.02)


def test_work_in_flight_is_held_unacked_and_fills_the_window(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    step.hold_back("m-1", "m-2", "m-3")
    w, _ = window(pool, step, broker, size=3)
    assert w.room() == 3
    submit(w, broker, steps(1, 2))
    assert w.room() == 1
    submit(w, broker, steps(3))
    assert w.room() == 0  # full: the consumer takes nothing more
    w.poll(broker)
    assert broker.acks == [] and broker.unacked() == [1, 2, 3]
    step.release("m-1", "m-2", "m-3")
    poll_until(w, broker, lambda: broker.unacked() == [])
    assert w.room() == 3


def test_a_step_that_finishes_is_acked_while_an_earlier_one_still_runs(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    step.hold_back("m-1", "m-2", "m-3")
    w, _ = window(pool, step, broker)
    submit(w, broker, steps(1, 2, 3))

    step.release("m-2")
    poll_until(w, broker, lambda: 2 in broker.acked())
    assert broker.acked() == {2}  # not 1: its provider call is still running
    step.release("m-3")
    poll_until(w, broker, lambda: 3 in broker.acked())
    assert broker.acked() == {2, 3}
    step.release("m-1")
    poll_until(w, broker, lambda: broker.unacked() == [])
    assert [tag for tag, _ in broker.acks] == [2, 3, 1]


def test_each_step_is_settled_before_its_ack(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    step.script("m-1", lambda d: handled_from(d, KeyError("lines"), ORDER))
    step.script("m-2", lambda d: handled_from(d, RetryLater("not placed yet"), ORDER))
    w, _ = window(pool, step, broker)
    submit(w, broker, steps(1))
    poll_until(w, broker, lambda: 1 in broker.acked())
    submit(w, broker, steps(2))
    poll_until(w, broker, lambda: 2 in broker.acked())
    assert broker.order() == [
        "publish orders.delay/orders.payments",
        "ack 1",
        "publish orders.delay/orders.payments",
        "ack 2",
    ]


def test_an_unconfirmed_retry_leaves_its_step_unacked(pool) -> None:
    step, broker = GatedStep(), RecordingBroker(refuse=lambda m: m.exchange == DELAY_EXCHANGE)
    step.script("m-1", lambda d: handled_from(d, KeyError("lines"), ORDER))
    w, _ = window(pool, step, broker)
    submit(w, broker, steps(1))
    with pytest.raises(ConnectionLost):
        poll_until(w, broker, lambda: False)
    assert broker.acks == [] and broker.unacked() == [1]


def test_a_database_outage_holds_the_step_and_runs_it_again_when_the_database_is_back(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    step.script("m-1", lambda d: handled_from(d, down(), ORDER))  # then applied
    w, hold = window(pool, step, broker, back_at=3.0)
    held: list[list[int]] = []
    broker.on_sleep.append(lambda b: held.append(b.unacked()))
    submit(w, broker, steps(1))
    poll_until(w, broker, lambda: broker.unacked() == [])
    # asked once when the failure is seen (still away: hold it), then probed with growing waits
    assert hold.probes == [0.0, 0.5, 1.5, 3.5]
    assert [1] in held  # unacked all the while
    assert step.calls == ["m-1", "m-1"]
    assert broker.published == [] and broker.acks == [(1, False)]  # no retry tier spent
    # run again, the step is told it is delivered again (as RabbitMQ's redelivery would): what it did the
    # first time (a provider call) may have happened, so a step that trusts a first delivery must not
    assert [d.redelivered for d in step.seen] == [False, True]
    assert step.seen[1].delivery_tag == 1


def test_an_outage_already_over_is_an_ordinary_failure(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    step.script("m-1", lambda d: handled_from(d, down(), ORDER))
    w, _ = window(pool, step, broker, back_at=0.0)  # the database answers when the failure is seen
    submit(w, broker, steps(1))
    poll_until(w, broker, lambda: broker.unacked() == [])
    assert broker.order() == ["publish orders.delay/orders.payments", "ack 1"]
    assert step.calls == ["m-1"]


def test_stopping_during_an_outage_leaves_the_held_step_unacked(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    stop = threading.Event()
    broker.on_sleep.append(lambda b: stop.set() if b.now >= 2.0 else None)
    step.script("m-1", lambda d: handled_from(d, down(), ORDER))
    w, _ = window(pool, step, broker, stop=stop, back_at=None)
    submit(w, broker, steps(1))
    with pytest.raises(StopRequested):
        poll_until(w, broker, lambda: False)
    assert broker.order() == [] and broker.unacked() == [1]


def test_join_finishes_settles_and_acks_everything_in_flight(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    step.hold_back("m-1", "m-2", "m-3")
    step.script("m-2", lambda d: handled_from(d, KeyError("lines"), ORDER))
    w, _ = window(pool, step, broker)
    submit(w, broker, steps(1, 2, 3))
    # the calls end one after another, in their own order, while join waits (heartbeats flowing)
    ending = ["m-3", "m-1", "m-2"]
    broker.on_sleep.append(lambda b: step.release(ending.pop(0)) if ending else None)
    w.join(broker)
    assert broker.unacked() == [] and w.room() == 3
    assert "publish orders.delay/orders.payments" in broker.order()  # m-2 settled (retried), then acked
    assert broker.order().index("publish orders.delay/orders.payments") < broker.order().index("ack 2")


def test_abandon_lets_work_under_way_end_and_acks_nothing(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    step.hold_back("m-1", "m-2")
    w, _ = window(pool, step, broker)
    submit(w, broker, steps(1, 2))
    step.release("m-1", "m-2")
    w.abandon()
    assert sorted(step.finished) == ["m-1", "m-2"]  # it waited for them
    assert broker.order() == [] and broker.unacked() == [1, 2]  # they come back unacked
    assert w.room() == 3


# -- the consumer's session around it: a stop with steps in flight


def session(broker: RecordingBroker, strategy: Any) -> _Session:
    consumer = SimpleNamespace(queues=["orders.payments"], idle=None, touch_liveness=lambda: None)
    return _Session(consumer, broker, strategy)  # type: ignore[arg-type]


def test_on_stop_steps_in_flight_and_those_delivered_before_the_cancel_are_finished_and_acked(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    stop = threading.Event()
    step.hold_back("m-1", "m-2")
    broker.deliver(steps(1, 2, 3, 4, 5))
    broker.on_poll.append(lambda b: stop.set())  # asked to stop while the first two are taken
    broker.on_sleep.append(lambda b: step.release("m-1", "m-2"))
    w, _ = window(pool, step, broker, size=2, stop=stop)
    session(broker, w).run(stop)
    assert broker.unacked() == [] and sorted(step.calls) == ["m-1", "m-2", "m-3", "m-4", "m-5"]


def test_a_lost_connection_abandons_the_steps_in_flight_unacked(pool) -> None:
    step, broker = GatedStep(), RecordingBroker()
    stop = threading.Event()
    step.hold_back("m-1", "m-2")
    broker.deliver(steps(1, 2))

    def lose(b: RecordingBroker) -> None:
        b.lost = True  # gone while the window is full and waits
        step.release("m-1", "m-2")  # the calls under way still end (abandon waits for them)

    broker.on_sleep.append(lose)
    w, _ = window(pool, step, broker, size=2, stop=stop)
    with pytest.raises(ConnectionLost):
        session(broker, w).run(stop)
    assert broker.acks == [] and broker.unacked() == [1, 2]
    assert sorted(step.finished) == ["m-1", "m-2"]


class BatchRecordingStep(GatedStep):
    """A :class:`GatedStep` that also records the batches it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def handle_batch(
        self, batch: list[Delivery], report: Callable[[list[Handled]], None] | None = None
    ) -> list[Handled]:
        with self._lock:
            self.batches.append([d.delivery_tag for d in batch])
        return super().handle_batch(batch, report)


def test_while_every_thread_runs_a_batch_what_arrives_waits_and_goes_into_the_next_batch_whole(pool) -> None:
    # two threads, batches of up to four: steps trickling in one at a time fill both threads with batches of
    # one; the five that arrive meanwhile are not queued behind them as five more batches of one, they wait
    # (unacked, in the prefetch) and the first thread that is free takes four of them as one batch
    step, broker = BatchRecordingStep(), RecordingBroker()
    step.hold_back(*(f"m-{i}" for i in range(1, 8)))
    w, _ = window(pool, step, broker, size=8, batch_size=4, slots=2)
    assert w.room() == 8
    submit(w, broker, steps(1))
    submit(w, broker, steps(2))
    poll_until(w, broker, lambda: len(step.batches) == 2)
    assert w.room() == 0  # both threads busy: nothing more is taken
    broker.deliver(steps(3, 4, 5, 6, 7))
    step.release("m-1")
    poll_until(w, broker, lambda: 1 in broker.acked() and w.room() > 0)
    assert w.room() == 4
    w.submit(broker, broker.poll(w.room(), 0.0, 0.0))
    assert w.room() == 0
    step.release("m-2")
    poll_until(w, broker, lambda: 2 in broker.acked() and w.room() > 0)
    w.submit(broker, broker.poll(w.room(), 0.0, 0.0))
    step.release("m-3", "m-4", "m-5", "m-6", "m-7")
    poll_until(w, broker, lambda: broker.unacked() == [])
    assert step.batches == [[1], [2], [3, 4, 5, 6], [7]]


# -- acks: one frame for the steps settled in a row, each of the others at once


class WaveStep(GatedStep):
    """A :class:`GatedStep` that reports its batch at once when the whole batch is done, as the payment runner
    reports a recorded wave, and says so (``reported``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = threading.Semaphore(0)

    def handle_batch(
        self, batch: list[Delivery], report: Callable[[list[Handled]], None] | None = None
    ) -> list[Handled]:
        done = [self.handle(d) for d in batch]
        if report is not None:
            report(done)
        self.reported.release()
        return done


def reported(step: WaveStep, batches: int = 1) -> None:
    for _ in range(batches):
        assert step.reported.acquire(timeout=GATE_SECONDS), "a batch never reported"


def test_steps_settled_in_a_row_are_acked_with_one_multiple_ack(pool) -> None:
    step, broker = WaveStep(), RecordingBroker()
    w, _ = window(pool, step, broker, size=8, batch_size=4, slots=2)
    submit(w, broker, steps(1, 2, 3, 4))
    reported(step)
    w.poll(broker)
    assert broker.acks == [(4, True)] and broker.unacked() == []


def test_steps_settled_above_one_still_running_are_acked_each_at_once_then_the_rest_in_one(pool) -> None:
    step, broker = WaveStep(), RecordingBroker()
    step.hold_back("m-1")
    w, _ = window(pool, step, broker, size=8, batch_size=2, slots=2)
    submit(w, broker, steps(1, 2, 3, 4))  # two batches: [1, 2] waits for its provider call, [3, 4] does not
    reported(step)
    w.poll(broker)
    # not held back behind the slow call, and not covered by a multiple ack (1 and 2 are not settled)
    assert broker.acks == [(3, False), (4, False)] and broker.unacked() == [1, 2]
    step.release("m-1")
    reported(step)
    w.poll(broker)
    assert broker.acks == [(3, False), (4, False), (2, True)] and broker.unacked() == []


def test_a_step_held_for_an_outage_is_not_covered_by_the_multiple_ack_of_those_after_it(pool) -> None:
    step, broker = WaveStep(), RecordingBroker()
    step.script("m-1", lambda d: handled_from(d, down(), ORDER))  # then applied
    w, _ = window(pool, step, broker, size=8, back_at=1.0, batch_size=4, slots=2)
    submit(w, broker, steps(1, 2, 3))
    reported(step)
    held: list[list[int]] = []
    broker.on_sleep.append(lambda b: held.append(b.unacked()))
    w.poll(broker)  # 2 and 3 settled and acked before the hold waits for the database; 1 held, unacked
    assert broker.acks[:2] == [(2, False), (3, False)] and [1] in held
    poll_until(w, broker, lambda: broker.unacked() == [])
    assert broker.acks == [(2, False), (3, False), (1, False)] and step.calls == ["m-1", "m-2", "m-3", "m-1"]
