"""What a handler may ask of the unit of work it runs in.

The worker's PostgreSQL implementation (``worker.unit_of_work``) loads and
locks every order a batch names before the handlers run, so the reads here
are plain lookups and every write lands in one transaction together with the
inbox row and the outbox events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from handlers.orders import Order


@dataclass(frozen=True)
class Product:
    product_id: str
    price: int
    currency: str
    active: bool


class PaymentStatus(enum.StrEnum):
    """Where an order's payment stands, as the payment step last recorded it (column ``payments.status``)."""

    STARTED = "started"  # asked for; the provider's answer is not recorded yet
    REQUIRES_ACTION = "requires_action"  # the buyer must act (3-D Secure, PayPal approval)
    PROCESSING = "processing"  # the provider is still deciding
    CAPTURING = "capturing"  # our capture of an approved PayPal order is under way
    SUCCEEDED = "succeeded"  # money taken
    DECLINED = "declined"  # the provider refused
    FAILED = "failed"  # the provider reported a failure after accepting the attempt
    CANCELLED = "cancelled"  # cancelled at the provider, or never captured
    REFUNDED = "refunded"  # money given back


@dataclass
class PaymentRecord:
    order_id: str
    provider: str
    status: PaymentStatus
    amount: int
    currency: str
    idempotency_key: str
    provider_payment_id: str | None = None
    capture_id: str | None = None
    refund_id: str | None = None
    confirmed_event_id: str | None = None
    attempts: int = 0
    last_error: str | None = None
    #: minor units given back so far (``amount`` once refunded in full; less after a partial refund)
    amount_refunded: int = 0
    #: seconds since the record last changed, by the database's clock (read only; 0 for a new record)
    unchanged_seconds: float = 0.0


@dataclass(frozen=True)
class Refusal:
    """What a ``command.refused`` event says was refused, and why: passed to :meth:`UnitOfWork.emit` with the
    event, so the order's story lists the refusal (``orders show``)."""

    command: str
    reason: str
    message: str


class UnitOfWork(Protocol):
    def products(self, product_ids: list[str]) -> dict[str, Product]:
        """Products by id (unknown ids are absent)."""

    def order(self, order_id: str) -> Order | None:
        """The order, locked for this unit of work, or None."""

    def add_order(self, order: Order) -> None:
        """Insert a new order with its lines."""

    def payment(self, order_id: str) -> PaymentRecord | None:
        """The order's payment record, or None."""

    def save_payment(self, payment: PaymentRecord) -> None:
        """Insert or update the payment record."""

    def emit(
        self,
        exchange: str,
        routing_key: str,
        message_type: str,
        body: dict[str, Any],
        order_id: str,
        correlation_id: str | None,
        event_id: str,
        refusal: Refusal | None = None,
    ) -> None:
        """Add a message about ``order_id`` to the outbox, published by the relay as ``event_id``; ``refusal``
        when the message is the announcement of one (``command.refused``)."""
