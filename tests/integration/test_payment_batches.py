"""The payment step in batches (worker/payment_runner.py), on the real unit of work: what a batch settles, and when.

A gateway of the test's own answers at once, late, or oddly; PostgreSQL is real.  A slow provider call holds up
only its own step (the others are recorded and reported while it is out); a batch whose record fails as a whole
is recorded again one step at a time, so one bad answer cannot fail the others; a step delivered twice in one
batch is applied once.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import text

from handlers.payments.base import PaymentOutcome, PaymentResult
from tests.support import place_body
from worker.commands import Applier, decode
from worker.handled import Handled, Result
from worker.payment_runner import PaymentRunner
from worker.rabbit.connection import Delivery


def delivery(message_type: str, body: dict[str, Any], queue: str, message_id: str | None = None) -> Delivery:
    return Delivery(
        1,
        "x",
        "",
        queue,
        json.dumps(body).encode(),
        message_id or str(uuid.uuid4()),
        message_type,
        None,
        None,
        "application/json",
        {},
        False,
    )


def placed(engine: Any, n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    batch = [delivery("PlaceOrder", place_body(order_id=o), "orders.place") for o in ids]
    assert all(h.result is Result.APPLIED for h in Applier(engine).apply_batch([(d, decode(d)) for d in batch]))
    return ids


def status(engine: Any, order_id: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(text("SELECT status FROM orders WHERE order_id = CAST(:o AS uuid)"), {"o": order_id}).scalar()
        )


class Gateway:
    """Answers at once, but holds back the orders named in ``slow`` until released, and answers ``odd`` oddly."""

    provider = "stripe"

    def __init__(self, slow: set[str] = frozenset(), odd: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.slow, self.odd = slow, odd
        self.release = threading.Event()
        self.calls: list[str] = []

    def start(self, request: Any) -> Any:
        self.calls.append(request.order_id)
        if request.order_id in self.slow:
            assert self.release.wait(10)
        if request.order_id in self.odd:
            return object()  # not a PaymentResult: recording it fails
        return PaymentResult(PaymentOutcome.SUCCEEDED, "pi_" + request.order_id[:12])


def starts(ids: list[str]) -> list[Delivery]:
    return [delivery("StartPayment", {"order_id": o}, "orders.payments") for o in ids]


def test_a_slow_provider_call_holds_up_only_its_own_step(clean_db):
    ids = placed(clean_db, 10)
    gateway = Gateway(slow={ids[3]})
    reported: list[Handled] = []
    with ThreadPoolExecutor(16) as calls:
        step = PaymentRunner(clean_db, {"stripe": gateway}, calls=calls)
        with ThreadPoolExecutor(1) as batches:
            job = batches.submit(step.handle_batch, starts(ids), reported.extend)
            deadline = threading.Event()
            while len(reported) < 9 and not deadline.wait(0.05):
                pass
            # nine recorded, committed and reported while the tenth call is still out
            assert sorted(h.order_id for h in reported) == sorted(ids[:3] + ids[4:])
            assert [status(clean_db, o) for o in ids if o != ids[3]] == ["completed"] * 9
            assert status(clean_db, ids[3]) == "pending" and not job.done()
            gateway.release.set()
            handled = job.result(10)
    assert [h.result for h in handled] == [Result.APPLIED] * 10 and len(reported) == 10
    assert status(clean_db, ids[3]) == "completed"


def test_a_batch_whose_record_fails_is_recorded_one_step_at_a_time_without_calling_again(clean_db):
    ids = placed(clean_db, 6)
    gateway = Gateway(odd={ids[2]})
    handled = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch(starts(ids))
    assert [h.result for h in handled] == [Result.APPLIED] * 2 + [Result.FAILED] + [Result.APPLIED] * 3
    assert [status(clean_db, o) for o in ids] == ["completed"] * 2 + ["pending"] + ["completed"] * 3
    assert sorted(gateway.calls) == sorted(ids)  # the answers were kept: nobody was asked twice


def test_a_step_delivered_twice_in_one_batch_or_again_later_is_applied_once(clean_db):
    [order] = placed(clean_db, 1)
    gateway = Gateway()
    first = delivery("StartPayment", {"order_id": order}, "orders.payments", message_id=f"start-{order}")
    again = delivery("StartPayment", {"order_id": order}, "orders.payments", message_id=f"start-{order}")
    handled = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([first, again])
    assert sorted(h.result.value for h in handled) == ["applied", "duplicate"]
    later = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([again])
    assert later[0].result is Result.DUPLICATE and gateway.calls == [order]
