"""``worker.consume.Batches``, the command strategy: a batch applied, settled, then one ``multiple`` ack.

Against the recording broker, with the real ``BatchApplier``, ``Settlement``
and ``DatabaseHold`` (on the broker's fake clock) and an applier whose
transactions are scripted (``ScriptedApplier``: a whole batch applies, fails,
or finds PostgreSQL away).  What is checked is what RabbitMQ would see:
nothing acked before every message of the batch is settled (its reply, its
retry or its dead letter confirmed), the batch acked once through its
highest tag, and work held unacked through a database outage and left
unacked when the worker stops meanwhile.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from structlog.testing import capture_logs

from handlers.outcome import Outcome
from schema.topology import DEAD_LETTER_EXCHANGE, DELAY_EXCHANGE
from tests.support import place_body
from tests.unit.recording_broker import RecordingBroker, ScriptedHold, delivery
from tests.unit.test_errors import wrapped
from worker.commands import Applier, BatchApplier, Decoded
from worker.consume import Batches, _Session
from worker.errors import ConnectionLost, StopRequested
from worker.handled import Handled, Result, handled_from
from worker.rabbit.connection import Delivery
from worker.settlement import Settlement

ORDER = "5b0c6f8e-4c8e-4a57-9d1e-2f1f1f1f1f1f"
PLACE = json.dumps(place_body()).encode()


def outage() -> Exception:
    return wrapped(psycopg2.OperationalError("server closed the connection unexpectedly"))


def applied(d: Delivery, _command: Any = None) -> Handled:
    return Handled(d, Result.APPLIED, Outcome("applied", ORDER, status="awaiting_payment"), order_id=ORDER)


class ScriptedApplier(Applier):
    """The real decoding; each transaction's fate scripted.

    ``batches``: what each ``apply_batch`` does in turn (an exception is raised; nothing left: every
    message applied). ``ones``: per message id, what each ``apply_one`` returns in turn.
    """

    def __init__(
        self,
        batches: list[BaseException] | None = None,
        ones: dict[str, list[Callable[[Delivery], Handled]]] | None = None,
    ) -> None:
        super().__init__(engine=None)  # type: ignore[arg-type]  # no transaction is ever opened
        self.batches = list(batches or [])
        self.ones = {k: list(v) for k, v in (ones or {}).items()}
        self.applied_batches: list[list[str]] = []
        self.applied_ones: list[str] = []

    def apply_batch(self, items: list[Decoded]) -> list[Handled]:
        if not items:
            return []  # as the real one: no transaction for nothing
        self.applied_batches.append([d.message_id or "" for d, _ in items])
        if self.batches:
            raise self.batches.pop(0)
        return [applied(d) for d, _ in items]

    def apply_one(self, d: Delivery, command: Any) -> Handled:
        self.applied_ones.append(d.message_id or "")
        script = self.ones.get(d.message_id or "")
        return script.pop(0)(d) if script else applied(d)


def batches(
    broker: RecordingBroker,
    applier: ScriptedApplier,
    stop: threading.Event | None = None,
    back_at: float | None = 0.0,
    batch_size: int = 10,
) -> tuple[Batches, ScriptedHold]:
    hold = ScriptedHold(broker, stop or threading.Event(), back_at)
    return Batches(BatchApplier(applier, hold), Settlement((1, 2)), batch_size, 0.01), hold


def places(*tags: int, **kw: Any) -> list[Delivery]:
    return [delivery(tag, "PlaceOrder", PLACE, **kw) for tag in tags]


def take(broker: RecordingBroker, deliveries: list[Delivery]) -> list[Delivery]:
    broker.taken(deliveries)
    return deliveries


def test_a_batch_is_settled_first_then_acked_once_through_its_highest_tag() -> None:
    broker = RecordingBroker()
    strategy, _ = batches(broker, ScriptedApplier())
    work = [
        *places(1, reply_to="amq.gen-replies"),
        delivery(2, "PlaceOrder", PLACE, message_id=""),  # no message_id: can never apply
        *places(3, 4),
    ]
    strategy.submit(broker, take(broker, work))
    assert broker.order() == [
        "publish orders.dlx/orders.place",  # the invalid one, dead-lettered
        "publish /amq.gen-replies",  # the applied one that asked for an answer
        "ack<= 4",
    ]
    assert broker.unacked() == []


def test_the_ack_goes_through_the_highest_tag_whatever_the_order() -> None:
    broker = RecordingBroker()
    strategy, _ = batches(broker, ScriptedApplier())
    strategy.submit(broker, take(broker, places(7, 5, 6)))
    assert broker.acks == [(7, True)] and broker.unacked() == []


def test_a_batch_that_fails_is_applied_one_by_one_and_acked_once() -> None:
    broken = wrapped(psycopg2.errors.lookup("23503")("violates foreign key constraint"))
    applier = ScriptedApplier(batches=[broken], ones={"m-2": [lambda d: handled_from(d, KeyError("lines"), ORDER)]})
    broker = RecordingBroker()
    strategy, _ = batches(broker, applier)
    strategy.submit(broker, take(broker, places(1, 2, 3)))
    assert applier.applied_ones == ["m-1", "m-2", "m-3"]
    assert broker.order() == ["publish orders.delay/orders.place", "ack<= 3"]  # m-2 retried, then the ack


def test_through_a_database_outage_the_batch_is_held_unacked_and_applied_when_it_is_back() -> None:
    broker = RecordingBroker()
    applier = ScriptedApplier(batches=[outage()])
    strategy, hold = batches(broker, applier, back_at=7.0)
    held: list[list[int]] = []
    broker.on_sleep.append(lambda b: held.append(b.unacked()))
    with capture_logs() as logs:
        strategy.submit(broker, take(broker, places(1, 2, 3)))
    assert held and all(h == [1, 2, 3] for h in held)  # nothing acked while the database is away
    assert hold.probes == [0.5, 1.5, 3.5, 7.5]
    assert applier.applied_batches == [["m-1", "m-2", "m-3"]] * 2  # the same batch, again
    assert broker.published == []  # no retry tier spent on an outage
    assert broker.acks == [(3, True)]
    assert [e["event"] for e in logs if e["log_level"] in ("error", "info")] == [
        "database unavailable, holding work until it is back",
        "database available again",
    ]


def test_an_outage_met_one_by_one_holds_that_message_too() -> None:
    broken = wrapped(psycopg2.errors.lookup("23503")("violates foreign key constraint"))
    down = wrapped(psycopg2.errors.lookup("57P01")("terminating connection due to administrator command"))
    applier = ScriptedApplier(batches=[broken], ones={"m-2": [lambda d: handled_from(d, down, ORDER)]})
    broker = RecordingBroker()
    strategy, hold = batches(broker, applier, back_at=1.0)
    strategy.submit(broker, take(broker, places(1, 2, 3)))
    assert applier.applied_ones == ["m-1", "m-2", "m-2", "m-3"]
    assert hold.probes == [0.5, 1.5]
    assert broker.order() == ["ack<= 3"]


def test_stopping_during_an_outage_leaves_the_whole_batch_unacked() -> None:
    broker = RecordingBroker()
    stop = threading.Event()
    broker.on_sleep.append(lambda b: stop.set() if b.now >= 2.0 else None)
    strategy, _ = batches(broker, ScriptedApplier(batches=[outage()]), stop, back_at=None)
    with pytest.raises(StopRequested):
        strategy.submit(broker, take(broker, places(1, 2, 3)))
    assert broker.order() == [] and broker.unacked() == [1, 2, 3]  # they go back to the queue


def test_an_unconfirmed_retry_leaves_the_batch_unacked() -> None:
    applier = ScriptedApplier(batches=[KeyError("x")], ones={"m-2": [lambda d: handled_from(d, KeyError("y"))]})
    broker = RecordingBroker(refuse=lambda m: m.exchange == DELAY_EXCHANGE)
    strategy, _ = batches(broker, applier)
    with pytest.raises(ConnectionLost):
        strategy.submit(broker, take(broker, places(1, 2, 3)))
    assert broker.acks == [] and broker.unacked() == [1, 2, 3]  # redelivered; the inbox absorbs m-1


def test_an_invalid_message_alone_is_dead_lettered_and_acked() -> None:
    broker = RecordingBroker()
    applier = ScriptedApplier()
    strategy, _ = batches(broker, applier)
    strategy.submit(broker, take(broker, [delivery(1, "ShipItNow", b"{}")]))
    assert broker.order() == ["publish orders.dlx/orders.place", "ack<= 1"]
    assert applier.applied_batches == []
    assert broker.published_to(DEAD_LETTER_EXCHANGE)[0].properties["headers"]["x-error-class"] == "InvalidMessage"


# -- the consumer's session around it: a stop with deliveries in hand


def session(broker: RecordingBroker, strategy: Any) -> _Session:
    consumer = SimpleNamespace(queues=["orders.place"], idle=None, touch_liveness=lambda: None)
    return _Session(consumer, broker, strategy)  # type: ignore[arg-type]


def test_on_stop_what_was_delivered_before_the_cancel_is_applied_and_acked() -> None:
    broker = RecordingBroker()
    stop = threading.Event()
    broker.deliver(places(1, 2, 3, 4, 5))
    broker.on_poll.append(lambda b: stop.set())  # the stop comes while the first batch is taken
    strategy, _ = batches(broker, ScriptedApplier(), stop, batch_size=2)
    session(broker, strategy).run(stop)
    assert broker.acks == [(2, True), (4, True), (5, True)]
    assert broker.unacked() == []


def test_a_lost_connection_ends_the_session_with_the_batch_unacked() -> None:
    broker = RecordingBroker(refuse=lambda m: m.exchange == DELAY_EXCHANGE)
    stop = threading.Event()
    broker.deliver(places(1, 2))
    applier = ScriptedApplier(batches=[KeyError("x")], ones={"m-2": [lambda d: handled_from(d, KeyError("y"))]})
    strategy, _ = batches(broker, applier, stop)
    with pytest.raises(ConnectionLost):
        session(broker, strategy).run(stop)
    assert broker.acks == [] and broker.unacked() == [1, 2]
