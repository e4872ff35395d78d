"""The order and its state machine: every allowed transition in one place.

``pending`` → ``awaiting_payment`` → ``completed`` → ``shipped``;
``pending``/``awaiting_payment`` → ``cancelled``; ``pending`` → ``rejected``;
``completed`` → ``refunded`` when the money goes back.
Two additions the contract leaves open: ``pending`` → ``completed`` (the
provider took the money at once, no buyer action needed) and
``awaiting_payment`` → ``rejected`` (the buyer's authentication failed).
Not ``shipped`` → ``refunded``: the contract lists only ``completed`` →
``refunded``; money for goods already sent goes back through a return, which
this service does not run, so a refund of a shipped order is refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from handlers.errors import IllegalTransition


class Status(str, enum.Enum):
    PENDING = "pending"
    AWAITING_PAYMENT = "awaiting_payment"
    COMPLETED = "completed"
    SHIPPED = "shipped"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    REFUNDED = "refunded"


TRANSITIONS: dict[Status | None, frozenset[Status]] = {
    None: frozenset({Status.PENDING, Status.REJECTED}),
    Status.PENDING: frozenset({Status.AWAITING_PAYMENT, Status.COMPLETED, Status.CANCELLED, Status.REJECTED}),
    Status.AWAITING_PAYMENT: frozenset({Status.COMPLETED, Status.CANCELLED, Status.REJECTED}),
    Status.COMPLETED: frozenset({Status.SHIPPED, Status.REFUNDED}),
    Status.SHIPPED: frozenset(),
    Status.CANCELLED: frozenset(),
    Status.REJECTED: frozenset(),
    Status.REFUNDED: frozenset(),
}

#: States from which stock was reserved and not yet committed or released.
HOLDS_STOCK = frozenset({Status.PENDING, Status.AWAITING_PAYMENT})
CANCELLABLE = frozenset({Status.PENDING, Status.AWAITING_PAYMENT})
#: States in which the order's own payment may be given back, and the order then shows it:
#: ``completed`` becomes ``refunded``; a cancelled or rejected order keeps its status and its
#: payment is recorded ``refunded`` (with ``order.refunded``)
REFUNDABLE = frozenset({Status.COMPLETED, Status.CANCELLED, Status.REJECTED})


def can_transition(current: Status | None, target: Status) -> bool:
    return target in TRANSITIONS[current]


@dataclass
class Line:
    product_id: str
    quantity: int
    unit_price: int


@dataclass
class Order:
    order_id: str
    user_id: str
    status: Status
    #: None only for a rejected order none of whose products is known
    currency: str | None
    total: int
    payment_provider: str
    payment_request: dict[str, Any]
    place_message_id: str
    lines: list[Line] = field(default_factory=list)
    next_action: dict[str, str] | None = None
    #: what the fulfilment service said when it shipped the order
    shipment: dict[str, str] | None = None
    reason: str | None = None
    correlation_id: str | None = None
    #: status as loaded from the database (None for a new order): the guard
    #: of the conditional UPDATE that writes this order back
    loaded_status: Status | None = None
    #: transitions made in this unit of work: (from, to, message_id, reason)
    transitions: list[tuple[Status | None, Status, str, str | None]] = field(default_factory=list)

    def transition(self, target: Status, message_id: str, reason: str | None = None) -> Status:
        """Move to ``target`` or raise :class:`IllegalTransition`."""
        current = self.status
        if not can_transition(current, target):
            raise IllegalTransition(f"order {self.order_id} is {current.value}, cannot become {target.value}")
        self.status = target
        if target is not Status.AWAITING_PAYMENT:
            self.next_action = None  # what the buyer needs next matters only while the payment waits for them
        if reason is not None:
            self.reason = reason
        self.transitions.append((current, target, message_id, reason))
        return current

    def stock_lines(self) -> list[dict[str, Any]]:
        return [{"product_id": line.product_id, "quantity": line.quantity} for line in self.lines]
