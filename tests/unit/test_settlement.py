"""``worker.settlement``: after the commit, the reply, a retry through the delay tiers, or a dead letter.

Against the recording broker: which tier each attempt takes and when a
message is dead-lettered instead, the headers a retried or dead-lettered
message carries (``failure_headers``), the replies to ``reply_to``, and a
publish the broker does not confirm (the original must then stay unacked).
"""

from __future__ import annotations

import hashlib
import json
import traceback
from datetime import datetime, timedelta
from typing import Any

import pytest

from handlers.errors import ManualActionRequired, NotFound, RetryLater
from handlers.outcome import Outcome
from schema.messages import InvalidMessage
from schema.topology import DEAD_LETTER_EXCHANGE, DELAY_EXCHANGE, DELAY_HEADER
from tests.unit.recording_broker import RecordingBroker, delivery
from worker.errors import ConnectionLost
from worker.handled import Handled, Result, handled_from
from worker.metrics import NullMetrics
from worker.rabbit.connection import Delivery, Outgoing
from worker.settlement import Settlement, failure_headers

DELAYS = (1, 5, 30)
ORDER = "5b0c6f8e-4c8e-4a57-9d1e-2f1f1f1f1f1f"


class RecordingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.retries: list[str | None] = []
        self.dead: list[tuple[str | None, str]] = []

    def retried(self, message_type: str | None) -> None:
        self.retries.append(message_type)

    def dead_lettered(self, message_type: str | None, error_class: str) -> None:
        self.dead.append((message_type, error_class))


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a handler raises it."""
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - handed back
        return caught


def failed(d: Delivery, exc: BaseException | None = None) -> Handled:
    return handled_from(d, raised(exc or KeyError("lines")), ORDER)


def settle(h: Handled, broker: RecordingBroker | None = None, metrics: Any = None) -> RecordingBroker:
    broker = broker or RecordingBroker()
    Settlement(DELAYS, metrics or NullMetrics()).settle(broker, h)
    return broker


def only(broker: RecordingBroker) -> Outgoing:
    assert len(broker.published) == 1, broker.order()
    return broker.published[0]


# -- the delay tiers


@pytest.mark.parametrize(
    ("attempts", "exchange", "tier"),
    [
        (None, DELAY_EXCHANGE, "1s"),  # the first failure: no x-attempts yet
        (1, DELAY_EXCHANGE, "5s"),
        (2, DELAY_EXCHANGE, "30s"),
        (3, DEAD_LETTER_EXCHANGE, None),  # every tier spent
        (7, DEAD_LETTER_EXCHANGE, None),
    ],
)
@pytest.mark.parametrize("why", ["failed", "deferred"])
def test_each_attempt_takes_the_next_tier_then_the_dead_letter_queue(
    attempts: int | None, exchange: str, tier: str | None, why: str
) -> None:
    headers = {} if attempts is None else {"x-attempts": attempts}
    d = delivery(1, "CancelOrder", queue="orders.cancel", routing_key="order.cancel", headers=headers)
    h = failed(d) if why == "failed" else handled_from(d, RetryLater("order not placed yet"), ORDER)
    out = only(settle(h))
    assert (out.exchange, out.routing_key) == (exchange, "orders.cancel")  # back to the queue it came from
    assert out.properties["headers"].get(DELAY_HEADER) == tier
    assert out.properties["headers"]["x-attempts"] == (attempts or 0) + 1


def test_a_message_that_can_never_apply_is_dead_lettered_at_once() -> None:
    for exc in (InvalidMessage("body.user_id: Field required"), ManualActionRequired("refund by hand")):
        out = only(settle(handled_from(delivery(1), exc)))
        assert out.exchange == DEAD_LETTER_EXCHANGE
        headers = out.properties["headers"]
        assert (headers["x-error-class"], headers["x-error-message"], headers["x-attempts"]) == (
            type(exc).__name__,
            str(exc),
            1,
        )
        assert DELAY_HEADER not in headers and "x-error-traceback" not in headers


def test_no_tiers_means_the_first_failure_is_dead_lettered() -> None:
    broker = RecordingBroker()
    Settlement(()).settle(broker, failed(delivery(1)))
    assert only(broker).exchange == DEAD_LETTER_EXCHANGE


def test_retries_and_dead_letters_are_counted() -> None:
    metrics = RecordingMetrics()
    settle(failed(delivery(1, "PlaceOrder")), metrics=metrics)
    settle(failed(delivery(2, "PlaceOrder", headers={"x-attempts": 3})), metrics=metrics)
    settle(handled_from(delivery(3, "CancelOrder"), InvalidMessage("bad")), metrics=metrics)
    assert metrics.retries == ["PlaceOrder"]
    assert metrics.dead == [("PlaceOrder", "KeyError"), ("CancelOrder", "InvalidMessage")]


# -- the headers of a retried or dead-lettered message


def test_a_retried_message_keeps_its_body_and_properties_and_says_where_it_came_from() -> None:
    d = delivery(
        4,
        "PlaceOrder",
        b'{"user_id": "u-1"}',
        message_id="m-4",
        correlation_id="c-4",
        reply_to="amq.rabbitmq.reply-to.x",
        headers={"traceparent": "00-abc-def-01"},
    )
    out = only(settle(failed(d)))
    assert out.body == d.body
    props = out.properties
    assert {k: props[k] for k in ("message_id", "type", "correlation_id", "reply_to", "timestamp", "app_id")} == {
        "message_id": "m-4",
        "type": "PlaceOrder",
        "correlation_id": "c-4",
        "reply_to": "amq.rabbitmq.reply-to.x",
        "timestamp": d.timestamp,
        "app_id": d.app_id,
    }
    h = props["headers"]
    assert h["traceparent"] == "00-abc-def-01"  # the message's own headers stay
    assert (h["x-original-exchange"], h["x-original-routing-key"], h["x-original-queue"]) == (
        "orders.commands",
        "order.place",
        "orders.place",
    )
    assert d.headers == {"traceparent": "00-abc-def-01"}  # the delivery itself is not changed


def test_the_error_is_named_with_a_digest_of_its_traceback() -> None:
    h = failed(delivery(1), ValueError("quantity is negative"))
    tb = "".join(traceback.format_exception(h.error))
    headers = only(settle(h)).properties["headers"]
    assert headers["x-error-class"] == "ValueError"
    assert headers["x-error-message"] == "ValueError: quantity is negative"
    assert headers["x-error-digest"] == hashlib.sha256(tb.encode()).hexdigest()[:16]
    assert headers["x-error-traceback"] == tb[-2000:] and "quantity is negative" in headers["x-error-traceback"]


def test_a_deferred_message_carries_no_traceback() -> None:
    headers = only(settle(handled_from(delivery(1), RetryLater("not placed yet")))).properties["headers"]
    assert headers["x-error-class"] == "RetryLater"
    assert "x-error-digest" not in headers and "x-error-traceback" not in headers


def test_a_second_failure_keeps_where_and_when_it_first_failed() -> None:
    first = only(settle(failed(delivery(1, queue="orders.place")))).properties["headers"]
    # the retry comes back from the delay tier: another exchange and routing key, same queue
    again = delivery(9, exchange="", routing_key="orders.place", headers=first)
    second = only(settle(failed(again, RuntimeError("still broken")))).properties["headers"]
    for key in ("x-original-exchange", "x-original-routing-key", "x-original-queue", "x-first-failure-at"):
        assert second[key] == first[key], key
    assert second["x-attempts"] == 2 and second[DELAY_HEADER] == "5s"
    assert second["x-error-class"] == "RuntimeError"
    assert datetime.fromisoformat(second["x-last-failure-at"]) >= datetime.fromisoformat(first["x-last-failure-at"])
    assert datetime.fromisoformat(second["x-first-failure-at"]).utcoffset() == timedelta(0)


def test_a_dead_letter_drops_the_tier_it_came_through() -> None:
    d = delivery(1, headers={"x-attempts": 3, DELAY_HEADER: "30s"})
    assert DELAY_HEADER not in only(settle(failed(d))).properties["headers"]


def test_failure_headers_cut_long_messages_and_tracebacks() -> None:
    d = delivery(1)
    h = failure_headers(d, "ValueError", "m" * 5000, "t" * 9000)
    assert len(h["x-error-message"]) == 1000 and len(h["x-error-traceback"]) == 2000
    assert failure_headers(d, "X", "why", None).keys().isdisjoint({"x-error-digest", "x-error-traceback"})
    assert h["x-attempts"] == 1
    assert failure_headers(delivery(1, headers={"x-attempts": "2"}), "X", "", None)["x-attempts"] == 3


# -- replies


def reply(broker: RecordingBroker) -> tuple[Outgoing, dict[str, Any]]:
    out = only(broker)
    return out, json.loads(out.body)


def test_an_applied_command_is_answered_with_its_outcome() -> None:
    d = delivery(1, reply_to="amq.rabbitmq.reply-to.abc", correlation_id="corr-1")
    outcome = Outcome("applied", ORDER, status="awaiting_payment", next_action={"type": "redirect"})
    out, body = reply(settle(Handled(d, Result.APPLIED, outcome, order_id=ORDER)))
    assert (out.exchange, out.routing_key) == ("", "amq.rabbitmq.reply-to.abc")
    assert out.properties == {"correlation_id": "corr-1", "type": "CommandOutcome", "delivery_mode": 1}
    assert body == outcome.as_dict()


def test_a_refusal_is_answered_with_its_reason() -> None:
    d = delivery(1, reply_to="amq.gen-replies")
    _, body = reply(settle(handled_from(d, NotFound("no such order"), ORDER)))
    assert body == {"result": "refused", "order_id": ORDER, "error": "not_found", "message": "no such order"}


def test_a_duplicate_is_answered_as_one_even_with_an_outcome() -> None:
    d = delivery(1, reply_to="amq.gen-replies", message_id="m-dup")
    out, body = reply(settle(Handled(d, Result.DUPLICATE, Outcome("applied", ORDER), order_id=ORDER)))
    assert body == {"result": "duplicate", "order_id": ORDER}
    assert out.properties["correlation_id"] == "m-dup"  # no correlation id: the message id answers


def test_applied_without_an_outcome_says_applied() -> None:
    _, body = reply(settle(Handled(delivery(1, reply_to="amq.gen-replies"), Result.APPLIED, order_id=ORDER)))
    assert body == {"result": "applied", "order_id": ORDER}


def test_without_reply_to_nothing_is_published() -> None:
    for result in (Result.APPLIED, Result.DUPLICATE, Result.REFUSED):
        assert settle(Handled(delivery(1), result, order_id=ORDER)).published == []


def test_a_failure_is_not_answered() -> None:
    broker = settle(failed(delivery(1, reply_to="amq.gen-replies")))
    assert [m.exchange for m in broker.published] == [DELAY_EXCHANGE]


# -- a publish the broker does not confirm


def test_an_unconfirmed_retry_raises_so_the_original_stays_unacked() -> None:
    broker = RecordingBroker(refuse=lambda m: m.exchange == DELAY_EXCHANGE)
    with pytest.raises(ConnectionLost):
        settle(failed(delivery(1)), broker)
    assert broker.order() == ["nacked orders.delay/orders.place"]


def test_an_unconfirmed_dead_letter_raises_so_the_original_stays_unacked() -> None:
    broker = RecordingBroker(refuse=lambda m: m.exchange == DEAD_LETTER_EXCHANGE)
    with pytest.raises(ConnectionLost):
        settle(handled_from(delivery(1), InvalidMessage("bad")), broker)


def test_an_unconfirmed_reply_is_let_go() -> None:
    broker = RecordingBroker(refuse=lambda m: m.exchange == "")
    settle(Handled(delivery(1, reply_to="amq.gen-gone"), Result.APPLIED, order_id=ORDER), broker)  # no raise: ack it
    assert broker.order() == ["nacked /amq.gen-gone"]


@pytest.mark.parametrize("reply_to", ["orders.dead-letter", "orders.place", "my-replies"])
def test_a_reply_to_that_is_no_reply_queue_is_ignored_and_counted(reply_to: str) -> None:
    """Issue 20: a sender named orders.dead-letter and the worker wrote its "reply" there, where the sender may not."""
    counted: list[str] = []

    class Counting(NullMetrics):
        def reply_ignored(self) -> None:
            counted.append(reply_to)

    broker = RecordingBroker()
    for _ in range(2):
        Settlement((1, 5), Counting()).settle(
            broker, Handled(delivery(1, reply_to=reply_to), Result.APPLIED, order_id=ORDER)
        )
    assert broker.published == [] and counted == [reply_to, reply_to]
