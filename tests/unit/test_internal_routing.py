"""Every internal command a handler emits reaches the payment step.

The relay publishes outbox rows without ``mandatory`` (events may have no
consumer yet), so an internal command whose routing key is not bound to
``orders.payments`` would vanish without a trace: ``SettlePayment`` did,
until this test.  The handlers' sources are read for every
``events.internal(..., "<Command>", "<routing key>", ...)``.
"""

from __future__ import annotations

import re
from pathlib import Path

from handlers.payment_step import payment_steps
from schema.messages import COMMANDS
from worker.broker import PAYMENT_ROUTING_KEYS

HANDLERS = Path(__file__).resolve().parents[2] / "handlers"
_EMIT = re.compile(r'events\.internal\(\s*uow,\s*\w+,\s*"(\w+)",\s*"([\w.]+)"')


def emitted() -> set[tuple[str, str]]:
    return {m.groups() for f in HANDLERS.rglob("*.py") for m in _EMIT.finditer(f.read_text())}


def test_every_internal_command_is_bound_to_the_payment_queue_and_has_a_step():
    found = emitted()
    assert {command for command, _ in found} >= {"StartPayment", "RefundPayment", "CancelPayment", "SettlePayment"}
    steps = payment_steps()
    for command, routing_key in found:
        assert routing_key in PAYMENT_ROUTING_KEYS, f"{command} on {routing_key} would be dropped by the broker"
        assert command in steps and command in COMMANDS, f"{command} has no payment step"
