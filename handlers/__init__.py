"""Command handlers: one module per command, plain functions over a unit of work.

``COMMAND_HANDLERS`` maps a command class to its handler; which queue and
routing key a command travels on is :mod:`schema.topology`'s business, and
the worker knows nothing else about the commands.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

from handlers.cancel_order import cancel_order
from handlers.orders import DEFAULT_RULES, Rules
from handlers.outcome import MessageContext, Outcome
from handlers.payment_confirmed import payment_confirmed
from handlers.place_order import place_order
from handlers.ship_order import ship_order
from handlers.unit_of_work import UnitOfWork
from schema import messages


class Handler(Protocol):
    """A command handler: the command, its message's context, the unit of work of the batch."""

    def __call__(self, command: Any, msg: MessageContext, uow: UnitOfWork, /) -> Outcome: ...


def command_handlers(rules: Rules = DEFAULT_RULES) -> dict[type[messages.Command], Handler]:
    """The handlers by command class, with the shop's lifecycle rules where a handler needs them."""
    return {
        messages.PlaceOrder: place_order,
        messages.CancelOrder: functools.partial(cancel_order, rules=rules),
        messages.PaymentConfirmed: payment_confirmed,
        messages.ShipOrder: ship_order,
    }


#: with the default rules
COMMAND_HANDLERS = command_handlers()

#: order in which a batch applies its commands: placing first, so a cancel or
#: confirmation that raced its PlaceOrder into the same batch finds the order
APPLY_ORDER: dict[type[messages.Command], int] = {messages.PlaceOrder: 0}


def apply_rank(command: messages.Command) -> int:
    return APPLY_ORDER.get(type(command), 1)


def order_id_of(command: messages.Command, message_id: str) -> str:
    if isinstance(command, messages.PlaceOrder):
        return command.resolved_order_id(message_id)
    return str(command.order_id)  # type: ignore[attr-defined]
