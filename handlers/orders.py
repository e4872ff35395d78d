"""The order and its state machine: every allowed transition in one place.

``pending`` → ``awaiting_payment`` → ``completed`` → ``shipped``;
``pending`` → ``completed`` when the provider takes the money at once (no
buyer action needed); ``pending``/``awaiting_payment`` → ``cancelled`` or
``rejected`` (unknown product, declined or failed payment, the buyer's
authentication failed); ``awaiting_payment`` → ``expired`` when the buyer has
not paid within ``orders.payment_timeout_minutes``; ``completed`` →
``cancelled`` (a cancel from a sender that may act as admin, or the owner
within ``orders.customer_cancel_minutes`` of payment: the money is refunded)
and ``completed`` → ``refunded`` when the money goes back in full.  A
shipped order keeps its status when its money goes back (a refund at the
provider is recorded on the payment); goods already sent come back through a
return, which this service does not run.
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
    EXPIRED = "expired"


TRANSITIONS: dict[Status | None, frozenset[Status]] = {
    None: frozenset({Status.PENDING, Status.REJECTED}),
    Status.PENDING: frozenset({Status.AWAITING_PAYMENT, Status.COMPLETED, Status.CANCELLED, Status.REJECTED}),
    Status.AWAITING_PAYMENT: frozenset({Status.COMPLETED, Status.CANCELLED, Status.REJECTED, Status.EXPIRED}),
    Status.COMPLETED: frozenset({Status.SHIPPED, Status.REFUNDED, Status.CANCELLED}),
    Status.SHIPPED: frozenset(),
    Status.CANCELLED: frozenset(),
    Status.REJECTED: frozenset(),
    Status.REFUNDED: frozenset(),
    Status.EXPIRED: frozenset(),
}

#: Not paid yet: stock reserved and neither committed nor released; the money, when it comes, completes it.
UNPAID = frozenset({Status.PENDING, Status.AWAITING_PAYMENT})
#: States from which stock was reserved and not yet committed or released.
HOLDS_STOCK = UNPAID
#: What anyone allowed to cancel the order may cancel; a paid (``completed``) order only an admin (or the
#: owner within ``orders.customer_cancel_minutes``), with a refund
CANCELLABLE = UNPAID
PAID_CANCELLABLE = frozenset({Status.COMPLETED})
#: Ended before its money came: money that lands afterwards is given back (``order.refunded``)
ENDED_UNPAID = frozenset({Status.CANCELLED, Status.REJECTED, Status.EXPIRED})
#: States whose committed stock is still held by the order (``stock.commit`` and no ``stock.return``)
HOLDS_COMMITTED = frozenset({Status.COMPLETED, Status.SHIPPED})
#: States in which the order's own payment may be given back, and the order then shows it:
#: ``completed`` becomes ``refunded``; a cancelled, rejected or expired order keeps its status and its
#: payment is recorded ``refunded`` (with ``order.refunded``)
REFUNDABLE = frozenset({Status.COMPLETED, Status.CANCELLED, Status.REJECTED, Status.EXPIRED})


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
    #: seconds since it was paid (completed), by the database's clock; None when it was never paid (read only)
    paid_seconds_ago: float | None = None
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


@dataclass(frozen=True)
class Rules:
    """A shop's choices in the lifecycle: the ``orders`` section of the settings, handed to the handlers."""

    #: minutes an order may wait for its buyer's payment before it expires; 0: it never does
    payment_timeout_minutes: float = 60
    #: minutes after payment during which the owner may still cancel (and is refunded); 0: only an admin may
    customer_cancel_minutes: float = 0

    def owner_may_cancel_paid(self, order: Order) -> bool:
        """Whether the owner may still cancel this paid order (an admin always may, until it ships)."""
        paid = order.paid_seconds_ago
        return self.customer_cancel_minutes > 0 and paid is not None and paid <= self.customer_cancel_minutes * 60


#: the rules of the shipped configuration (a 60-minute payment deadline; only an admin cancels a paid order)
DEFAULT_RULES = Rules()
