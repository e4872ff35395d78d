"""Message models: the command and event bodies of the public contract.

Strict: unknown fields, wrong types, non-positive quantities, empty item
lists, oversized strings, strings holding NUL or any other control character
(:class:`Text`, the one check every model here and the shim's request models
inherit) and bodies with a duplicated JSON key (:func:`schema.jsonstrict.loads_no_duplicates`)
are rejected, and the error names the field.  PostgreSQL cannot store a NUL
in text: a command carrying one must fail here, as invalid, not at the
commit after five attempts.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import uuid
from typing import Annotated, Any, Literal, NotRequired, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

from schema.jsonstrict import loads_no_duplicates

#: Namespace for order ids derived from a PlaceOrder's message_id.
ORDER_ID_NAMESPACE = uuid.UUID("6f1d5b8e-3c4a-4f7e-9b0e-2d8c1a7e5f30")


def uuid5(namespace: uuid.UUID, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``, three times faster (it runs per event)."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


MAX_MESSAGE_ID = 200
MAX_ITEMS = 100
MAX_QUANTITY = 10_000

Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
ProductId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
Url = Annotated[str, StringConstraints(min_length=8, max_length=2000, pattern=r"^https?://[^\s\x00-\x1f\x7f-\x9f]+$")]


#: C0 controls (NUL, newline, tab, ...), DEL and the C1 controls
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: the same rule as a JSON Schema pattern, so that the OpenAPI document says it too
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"


def check_text(value: Any) -> Any:
    """``value`` unchanged; ValueError when any string in it holds a control character."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise ValueError("must not contain NUL or other control characters")
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k)
            check_text(v)
    return value


class Text(BaseModel):
    """Base of every model that takes text from outside: no string may hold a control character."""

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        return check_text(value)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        for prop in handler.resolve_ref_schema(schema).get("properties", {}).values():
            for branch in (prop, *prop.get("anyOf", ())):
                if branch.get("type") == "string" and not {"pattern", "format", "enum", "const"} & branch.keys():
                    branch["pattern"] = NO_CONTROL_PATTERN
        return schema


class _Strict(Text):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Item(_Strict):
    product_id: ProductId
    quantity: int = Field(gt=0, le=MAX_QUANTITY)


class StripePayment(_Strict):
    provider: Literal["stripe"]
    payment_method: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class PayPalPayment(_Strict):
    provider: Literal["paypal"]
    return_url: Url
    cancel_url: Url


Payment = Annotated[StripePayment | PayPalPayment, Field(discriminator="provider")]


def check_item_form(order: Any) -> None:
    """``items``, or the single-product form ``product_id`` + ``quantity``: exactly one."""
    single = order.product_id is not None or order.quantity is not None
    if order.items is not None and single:
        raise ValueError("give either items or product_id + quantity, not both")
    if order.items is None and (order.product_id is None or order.quantity is None):
        raise ValueError("items is required (or product_id + quantity)")


class Command(_Strict):
    """A command the service applies: one of the routes of :mod:`schema.topology`."""


class PlaceOrder(Command):
    """Place an order: `items` (or the single-product form `product_id` + `quantity`, not both) and how it is
    paid. Prices come from the service's own product table, never from the message; `order_id`, when absent,
    is derived from `message_id`."""

    order_id: uuid.UUID | None = None
    user_id: Id
    items: list[Item] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)
    product_id: ProductId | None = None
    quantity: int | None = Field(default=None, gt=0, le=MAX_QUANTITY)
    payment: Payment

    @model_validator(mode="after")
    def _one_item_form(self) -> PlaceOrder:
        check_item_form(self)
        return self

    def lines(self) -> list[Item]:
        if self.items is not None:
            return list(self.items)
        assert self.product_id is not None and self.quantity is not None
        return [Item(product_id=self.product_id, quantity=self.quantity)]

    def resolved_order_id(self, message_id: str) -> str:
        if self.order_id is not None:
            return str(self.order_id)
        return uuid5(ORDER_ID_NAMESPACE, message_id)


class Requester(_Strict):
    user_id: Id
    roles: list[Literal["user", "admin"]] = Field(max_length=10)


class _OrderCommand(Command):
    order_id: uuid.UUID


class CancelOrder(_OrderCommand):
    """Cancel an order: its owner while it waits for its payment, or a sender allowed to act as admin (then
    also a paid order that has not shipped, refunded in full). `roles: ["admin"]` counts only from such a
    sender."""

    requested_by: Requester
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class Shipment(_Strict):
    carrier: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    tracking_number: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class ShipOrder(_OrderCommand):
    """From the fulfilment service: a `completed` order has left the warehouse (then no cancel is taken)."""

    shipment: Shipment


class PaymentConfirmed(_OrderCommand):
    """A payment was taken for an order (`amount` in minor units). A confirmation that does not match the
    order, or names another provider than the order's, is settled by asking the order's provider."""

    provider: Literal["stripe", "paypal", "internal"]
    payment_id: Id
    amount: int = Field(ge=0)
    currency: Currency
    event_id: Id


# -- internal commands of the payment step (queue orders.payments) ----------


class StartPayment(_OrderCommand):
    """Ask the order's provider for its money (keyed by the order, so at most once)."""


class CapturePayment(_OrderCommand):
    """Capture a PayPal order the buyer approved."""

    provider: Literal["paypal"]
    payment_id: Id
    event_id: Id


class PaymentFailed(_OrderCommand):
    """The provider reported the payment failed (its webhook)."""

    provider: Literal["stripe", "paypal", "internal"]
    payment_id: Id
    event_id: Id
    reason: Annotated[str, StringConstraints(max_length=1000)] | None = None


class RefundPayment(_OrderCommand):
    """Give the order's money back in full (or a second payment's, named by `payment_id`)."""

    #: a second payment to give back (the order was paid another way meanwhile)
    payment_id: Id | None = None
    #: what that payment took, when it is not the order's total (a confirmation of a wrong amount)
    amount: int | None = Field(default=None, ge=0)
    currency: Currency | None = None


class CancelPayment(_OrderCommand):
    """Cancel the order's open payment at the provider (or a second one, named by `payment_id`)."""

    #: a second payment to cancel (the order was paid another way meanwhile)
    payment_id: Id | None = None


class SettlePayment(_OrderCommand):
    """A confirmation not to be taken at its word: ask the provider about the payment it names.

    Sent by the PaymentConfirmed handler when the confirmation does not match
    the recorded payment, and for every PayPal confirmation (its webhook is
    only as good as a certificate check); the payment step retrieves the
    payment and completes the order on it, or refuses the confirmation.
    """

    provider: Literal["stripe", "paypal"]
    payment_id: Id
    amount: int = Field(ge=0)
    currency: Currency
    event_id: Id
    #: message id and correlation id of the PaymentConfirmed, for its refusal
    confirmation_id: Id
    correlation_id: Id | None = None


class SettleRefund(_OrderCommand):
    """A refund the provider reported (its webhook): ask the provider what went back from the order's payment.

    Sent by the shim for a verified ``charge.refunded`` (Stripe) or
    ``PAYMENT.CAPTURE.REFUNDED`` (PayPal), whoever made the refund (the
    provider's dashboard, or the service itself); the payment step looks the
    payment up and records what the provider says went back, once.
    """

    provider: Literal["stripe", "paypal"]
    #: the order's payment as the service records it: the PaymentIntent id (Stripe) or the PayPal order id
    payment_id: Id
    event_id: Id


CommandT = TypeVar("CommandT", bound=Command)


class InvalidMessage(Exception):
    """A message that can never be applied: wrong type, bad JSON, bad fields."""


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_body(model: type[CommandT], body: bytes) -> CommandT:
    """Decode a command body into ``model``; raises :class:`InvalidMessage` naming the field.

    Which model a message type names is :func:`schema.topology.parse_command`'s business.
    """
    message_type = model.__name__
    try:
        loads_no_duplicates(body)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(
            f"{message_type}: body: Invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage(f"{message_type}: body: {exc}") from None
    try:
        # JSON mode keeps strict types but takes JSON's forms (UUIDs as str)
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidMessage(f"{message_type}: {describe_validation_error(exc)}") from None


# -- events ------------------------------------------------------------------
#
# What the service publishes (through the outbox; ``schema.topology`` says where each goes).  The
# models are TypedDicts validated by pydantic: an event is the dict the outbox serializes, built in
# ``handlers/events.py`` (mypy checks every key there) and validated against its model as it is
# emitted (pydantic-core, about a microsecond: a BaseModel and its serializer cost several on the hot
# path).  ``NotRequired`` says what the contract says: such a field is left out when it does not
# apply, never sent as ``null``; a field typed ``... | None`` is always present and may be ``null``.

#: an order's status, as events and the HTTP API spell it (``handlers.orders.Status`` holds the same
#: values, a unit test keeps them equal; the ``orders`` table's check constraint is built from it)
ORDER_STATUSES = (
    "pending",
    "awaiting_payment",
    "completed",
    "shipped",
    "cancelled",
    "rejected",
    "refunded",
    "expired",
)

_EVENT_CONFIG = ConfigDict(extra="forbid", strict=True)

#: a UUID as text (events carry the ids as the strings they were made as)
UuidText = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]
#: an instant as ISO 8601 text with its UTC offset (``datetime.isoformat()``: ``…T12:00:00.123456+00:00``)
InstantText = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
OrderStatus = Annotated[str, WithJsonSchema({"type": "string", "enum": list(ORDER_STATUSES)})]


@with_config(_EVENT_CONFIG)
class EventLine(TypedDict):
    """A line of a stock event: how many units of a product."""

    product_id: str
    quantity: int


@with_config(_EVENT_CONFIG)
class ShipmentData(TypedDict):
    """How an order left the warehouse, as the fulfilment service said (ShipOrder)."""

    carrier: str
    tracking_number: str


@with_config(_EVENT_CONFIG)
class Event(TypedDict):
    """What every event carries."""

    event_id: Annotated[UuidText, Field(description="Stable per effect: the AMQP `message_id` too; deduplicate on it.")]
    order_id: Annotated[UuidText, Field(description="The order the event is about.")]
    occurred_at: Annotated[InstantText, Field(description="When the change was applied (UTC).")]


@with_config(_EVENT_CONFIG)
class StockEvent(Event):
    """Units reserved, released, committed or returned (exchange `inventory`)."""

    items: Annotated[list[EventLine], Field(description="The order's lines, one per product.")]


@with_config(_EVENT_CONFIG)
class OrderEvent(Event):
    """An order's state after the change (exchange `orders.events`)."""

    status: OrderStatus
    user_id: Annotated[str, Field(description="Whose order it is.")]
    total: Annotated[int, Field(description="Minor units (cents), priced from the service's product table.")]
    currency: Annotated[
        str | None, Field(description="ISO 4217; null for a rejected order none of whose products is known.")
    ]
    reason: NotRequired[
        Annotated[str, Field(description="Why it was rejected, cancelled or expired; left out when there is none.")]
    ]


@with_config(_EVENT_CONFIG)
class OrderAwaitingPayment(OrderEvent):
    """`order.awaiting_payment`: the provider waits for the buyer (3-D Secure, PayPal approval)."""

    next_action: NotRequired[
        Annotated[
            dict[str, str],
            Field(description="What the buyer does next: `client_secret` (Stripe) or `approve_url` (PayPal)."),
        ]
    ]


@with_config(_EVENT_CONFIG)
class OrderShipped(OrderEvent):
    """`order.shipped`: a completed order left the warehouse."""

    shipment: ShipmentData


@with_config(_EVENT_CONFIG)
class OrderRefunded(OrderEvent):
    """`order.refunded`: money went back to the buyer, in full or in part."""

    refund_id: NotRequired[Annotated[str, Field(description="The provider's id of the (last) refund.")]]
    amount_refunded: Annotated[int, Field(description="Minor units given back so far.")]
    full: Annotated[bool, Field(description="Whether that is the whole payment (false: a partial refund).")]


@with_config(_EVENT_CONFIG)
class CommandRefused(Event):
    """`command.refused`: a well-formed command refused for a business reason, or because its sender may not
    send it (`unauthorized`, the command then also dead-lettered)."""

    message_id: Annotated[str, Field(description="The refused command's `message_id`.")]
    command: Annotated[str, Field(description="Its type, e.g. `CancelOrder`.")]
    reason: Annotated[str, Field(description="A stable code: `not_cancellable`, `not_found`, `payment_mismatch`, …")]
    message: Annotated[str, Field(description="For people (at most 1,000 characters).")]
    correlation_id: Annotated[str | None, Field(description="The command's `correlation_id`, or null.")]


# -- the reply to a command ----------------------------------------------------------


class OutcomeResult(enum.StrEnum):
    """What applying a command came to (the reply's `result`)."""

    #: its effects are committed (an order placed, paid, cancelled, shipped, refunded, ...)
    APPLIED = "applied"
    #: applied, and the order it placed ended ``rejected`` (an unknown or inactive product, two currencies)
    REJECTED = "rejected"
    #: refused for a business reason (``error`` says which); nothing changed; announced as ``command.refused``
    REFUSED = "refused"
    #: its ``message_id`` was applied before: nothing changed again
    DUPLICATE = "duplicate"
    #: well-formed and allowed, with nothing to change (the same cancel or shipment again, a late answer)
    UNCHANGED = "unchanged"
    #: a payment confirmation that does not match the order (or a PayPal one): the provider is being asked
    SETTLING = "settling"


@with_config(_EVENT_CONFIG)
class CommandOutcome(TypedDict):
    """The reply a command gets when it names `reply_to` (AMQP `type` `CommandOutcome`, `correlation_id` the
    command's, else its `message_id`)."""

    result: OutcomeResult
    order_id: NotRequired[Annotated[UuidText | None, Field(description="The order; null when none is known.")]]
    status: NotRequired[Annotated[OrderStatus, Field(description="The order's status after the command.")]]
    error: NotRequired[Annotated[str, Field(description="A refusal's stable code (`not_cancellable`, ...).")]]
    message: NotRequired[str]
    next_action: NotRequired[
        Annotated[
            dict[str, str],
            Field(description="What the buyer does next: `client_secret` (Stripe) or `approve_url` (PayPal)."),
        ]
    ]
