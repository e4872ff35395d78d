"""``worker.handled.handled_from``: what an exception raised while applying a message means for it.

One row per error a handler raises (``handlers/errors.py``), ``InvalidMessage``
and the rest (the database, the broker, a provider, a bug).  The result
decides the settlement: REFUSED is answered and acked, DEFERRED and FAILED
take the delay tiers, INVALID is dead-lettered at once; ``outage`` says
whether a failure is held until PostgreSQL is back instead.
"""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest
from sqlalchemy import exc as sa_exc

from handlers import errors as handler_errors
from handlers.errors import (
    HandlerError,
    IllegalTransition,
    ManualActionRequired,
    Mismatch,
    NotCancellable,
    NotFound,
    Refused,
    RetryLater,
    Taken,
    Unauthorized,
)
from handlers.outcome import Outcome
from handlers.payments.base import PermanentPaymentError, TransientPaymentError
from schema.messages import InvalidMessage
from tests.unit.recording_broker import delivery
from tests.unit.test_errors import wrapped
from worker.errors import ConcurrentUpdate, ConnectionLost
from worker.handled import Handled, Result, handled_from

ORDER = "5b0c6f8e-4c8e-4a57-9d1e-2f1f1f1f1f1f"

REFUSALS = [
    NotFound("no order 5b0c…"),
    IllegalTransition("a shipped order cannot be shipped again"),
    NotCancellable("a shipped order cannot be cancelled"),
    Taken("order id already used"),
    Mismatch("amount 100 USD does not match 120 USD"),
    Refused("refused"),
]

#: (error, result, reason)
TABLE: list[tuple[BaseException, Result, str]] = [
    *[(exc, Result.REFUSED, str(exc)) for exc in REFUSALS],
    (RetryLater("order 5b0c… is not placed yet"), Result.DEFERRED, "order 5b0c… is not placed yet"),
    (ManualActionRequired("refund money never taken"), Result.INVALID, "refund money never taken"),
    # dead-lettered at once like an invalid message, but answered and counted as a refusal of its sender
    (
        Unauthorized("broker user 'shop' may not send ShipOrder"),
        Result.INVALID,
        "broker user 'shop' may not send ShipOrder",
    ),
    (InvalidMessage("body.user_id: Field required"), Result.INVALID, "body.user_id: Field required"),
    (HandlerError("some handler error"), Result.FAILED, "HandlerError: some handler error"),
    (KeyError("lines"), Result.FAILED, "KeyError: 'lines'"),
    (ConcurrentUpdate("lost the race"), Result.FAILED, "ConcurrentUpdate: lost the race"),
    (ConnectionLost("StreamLostError: EOF"), Result.FAILED, "ConnectionLost: StreamLostError: EOF"),
    (TransientPaymentError("stripe: 503"), Result.FAILED, "TransientPaymentError: stripe: 503"),
    (PermanentPaymentError("paypal: 422"), Result.FAILED, "PermanentPaymentError: paypal: 422"),
]


@pytest.mark.parametrize(("exc", "result", "reason"), TABLE, ids=[f"{type(e).__name__}-{r.value}" for e, r, _ in TABLE])
def test_each_error_gives_its_result_and_reason(exc: BaseException, result: Result, reason: str) -> None:
    d = delivery(7)
    h = handled_from(d, exc, ORDER)
    assert (h.result, h.reason, h.error, h.delivery, h.order_id) == (result, reason, exc, d, ORDER)
    assert not h.outage


@pytest.mark.parametrize("exc", REFUSALS, ids=[type(e).__name__ for e in REFUSALS])
def test_a_refusal_is_answered_with_its_code(exc: Refused) -> None:
    h = handled_from(delivery(1), exc, ORDER)
    assert h.outcome == Outcome("refused", ORDER, error=exc.code, message=str(exc))
    assert h.outcome.as_dict() == {"result": "refused", "order_id": ORDER, "error": exc.code, "message": str(exc)}


def test_only_a_refusal_carries_an_outcome() -> None:
    for exc, result, _ in TABLE:
        refusal = result is Result.REFUSED or isinstance(exc, Unauthorized)
        assert (handled_from(delivery(1), exc).outcome is not None) is refusal, exc


def test_a_sender_that_may_not_send_the_command_is_dead_lettered_and_counted_as_refused() -> None:
    h = handled_from(delivery(1), Unauthorized("no"), ORDER)
    assert h.result is Result.INVALID and h.outcome == Outcome("refused", ORDER, error="unauthorized", message="no")


def test_every_handler_error_has_a_row() -> None:
    def below(cls: type) -> set[type]:
        return {cls} | {c for sub in cls.__subclasses__() for c in below(sub)}

    declared = {c for c in below(HandlerError) if c.__module__ == handler_errors.__name__}
    assert declared <= {type(exc) for exc, _, _ in TABLE}


def test_a_database_outage_is_a_failure_held_not_retried() -> None:
    down = wrapped(psycopg2.OperationalError("server closed the connection unexpectedly"))
    h = handled_from(delivery(1), down, ORDER)
    assert h.result is Result.FAILED and h.outage
    assert h.reason == f"OperationalError: {down}"


def test_a_deadlock_is_a_failure_but_no_outage() -> None:
    h = handled_from(delivery(1), wrapped(psycopg2.errors.lookup("40P01")("deadlock detected")))
    assert h.result is Result.FAILED and not h.outage


def test_only_a_failure_can_be_an_outage() -> None:
    down = sa_exc.TimeoutError("QueuePool limit reached")
    assert Handled(delivery(1), Result.FAILED, error=down).outage
    for result in (Result.APPLIED, Result.DUPLICATE, Result.REFUSED, Result.DEFERRED, Result.INVALID):
        assert not Handled(delivery(1), result, error=down).outage, result
    assert not Handled(delivery(1), Result.FAILED).outage  # no error at all


def test_without_an_order_the_refusal_names_none() -> None:
    h = handled_from(delivery(1), NotFound("no such order"))
    assert h.order_id is None and h.outcome == Outcome("refused", None, error="not_found", message="no such order")
