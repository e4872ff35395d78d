"""Every internal command a handler emits reaches the payment step.

The relay publishes outbox rows without ``mandatory`` (events may have no
consumer yet), so an internal command whose routing key is not bound to
``orders.payments`` would vanish without a trace: ``SettlePayment`` did,
until this test.  The handlers' sources are read for every
``events.internal(uow, order, <Command>, ...)``; the routing key comes from
the command's route in :mod:`schema.topology`.
"""

from __future__ import annotations

import re
from pathlib import Path

from handlers.payment_commands import payment_handlers
from schema import messages
from schema.topology import PAYMENT_ROUTING_KEYS, PAYMENTS_QUEUE, route

HANDLERS = Path(__file__).resolve().parents[2] / "handlers"
_EMIT = re.compile(r"events\.internal\(\s*uow,\s*\w+,\s*(\w+),")


def emitted() -> set[str]:
    return {m.group(1) for f in HANDLERS.rglob("*.py") for m in _EMIT.finditer(f.read_text())}


def test_every_internal_command_is_bound_to_the_payment_queue_and_has_a_step():
    found = emitted()
    assert found >= {"StartPayment", "RefundPayment", "CancelPayment", "SettlePayment"}
    steps = payment_handlers()
    for name in found:
        command = getattr(messages, name)
        r = route(command)
        assert r.queue == PAYMENTS_QUEUE, f"{name} is consumed from {r.queue}, not the payment step's queue"
        assert r.routing_key in PAYMENT_ROUTING_KEYS, f"{name} on {r.routing_key} would be dropped by the broker"
        assert command in steps, f"{name} has no payment step"
