"""Command handlers: one module per command, plain functions over a unit of work.

``COMMAND_HANDLERS`` routes a message type to its model and handler; the
worker knows nothing else about the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from handlers.cancel_order import cancel_order
from handlers.outcome import MessageContext, Outcome
from handlers.payment_confirmed import payment_confirmed
from handlers.place_order import place_order
from schema import messages

Handler = Callable[[Any, MessageContext, Any], Outcome]

COMMAND_HANDLERS: dict[str, Handler] = {
    "PlaceOrder": place_order,
    "CancelOrder": cancel_order,
    "PaymentConfirmed": payment_confirmed,
}

#: order in which a batch applies its commands: placing first, so a cancel or
#: confirmation that raced its PlaceOrder into the same batch finds the order
APPLY_ORDER = {"PlaceOrder": 0, "CancelOrder": 1, "PaymentConfirmed": 1}


def order_id_of(command: Any, message_id: str) -> str:
    if isinstance(command, messages.PlaceOrder):
        return command.resolved_order_id(message_id)
    return str(command.order_id)
