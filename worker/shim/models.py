"""Request and response bodies of the HTTP API (they make the OpenAPI document).

The request body of ``POST /orders`` is the PlaceOrder body of docs/contract.md with
``user_id`` optional (it comes from the token).  The edge is stricter than
the message models (user ids and Stripe payment method ids are tokens, not
free text; optional fields are left out, never ``null``), and the command it
builds is validated again with :class:`schema.messages.PlaceOrder` before it
is published, so nothing the worker would refuse leaves the shim.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StringConstraints, model_validator

from handlers.orders import Status
from schema.messages import MAX_ITEMS, MAX_QUANTITY, PayPalPayment, ProductId, Text, check_item_form

if TYPE_CHECKING:
    from worker.read_model import OrderViewData

#: JSON carries UUIDs as strings: accept that form even though the model is strict
JsonUuid = Annotated[uuid.UUID, Strict(False)]
#: stricter than the message model at the edge: ids are tokens, not free text
UserId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._@:|+-]+$")]
PaymentMethod = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_]+$")]


def _whole_number(value: Any) -> Any:
    # JSON Schema's "integer" includes 2.0; strict pydantic does not: take the integral floats
    return int(value) if isinstance(value, float) and value.is_integer() else value


Quantity = Annotated[int, Field(gt=0, le=MAX_QUANTITY), BeforeValidator(_whole_number)]


class ItemRequest(Text):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    product_id: ProductId
    quantity: Quantity


class StripePaymentRequest(Text):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    provider: Literal["stripe"]
    payment_method: PaymentMethod = Field(description="A Stripe PaymentMethod id, e.g. `pm_card_visa`.")


PaymentRequest = Annotated[StripePaymentRequest | PayPalPayment, Field(discriminator="provider")]


def _optional_not_null(schema: dict[str, Any]) -> None:
    """Optional fields may be left out, not sent as ``null``: say so in the JSON schema."""
    for prop in schema.get("properties", {}).values():
        branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
        if len(branches) == 1 and len(prop["anyOf"]) == 2:
            del prop["anyOf"]
            prop.update(branches[0])
            prop.pop("default", None)


def _place_schema(schema: dict[str, Any]) -> None:
    _optional_not_null(schema)
    schema["oneOf"] = [
        {"required": ["items"], "not": {"anyOf": [{"required": ["product_id"]}, {"required": ["quantity"]}]}},
        {"required": ["product_id", "quantity"], "not": {"required": ["items"]}},
    ]


class _Request(Text):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = sorted(k for k, v in data.items() if v is None)
            if nulls:
                raise ValueError(f"leave out {', '.join(nulls)} instead of sending null")
        return data


class PlaceOrderRequest(_Request):
    """An order to place: ``items`` (or ``product_id`` + ``quantity``) and ``payment``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, json_schema_extra=_place_schema)

    order_id: JsonUuid | None = None
    user_id: UserId | None = Field(default=None, description="Only an admin may name a user other than itself.")
    items: list[ItemRequest] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)
    product_id: ProductId | None = None
    quantity: Quantity | None = None
    payment: PaymentRequest

    @model_validator(mode="after")
    def _one_item_form(self) -> PlaceOrderRequest:
        check_item_form(self)
        return self


class CancelRequest(_Request):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, json_schema_extra=_optional_not_null)  # type: ignore[typeddict-item]

    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class Accepted(BaseModel):
    """The command was confirmed by the broker; the worker applies it shortly."""

    order_id: uuid.UUID
    status: str = Field(description="`pending` for a new order; `cancel_requested` for a cancel.")
    status_url: str


class OrderLine(BaseModel):
    product_id: str
    quantity: int
    unit_price: int


class PaymentView(BaseModel):
    provider: str
    status: str
    refund: Literal["pending", "partial", "refunded"] | None = Field(
        default=None,
        description="`pending` while the money of an order that ended is being given back, `partial` after a "
        "partial refund at the provider, `refunded` once it all went back.",
    )
    amount_refunded: int | None = Field(default=None, description="Minor units given back so far.")


class ShipmentView(BaseModel):
    carrier: str
    tracking_number: str


class OrderView(BaseModel):
    """An order as its owner (or an admin) sees it: no card data, no provider secrets."""

    order_id: uuid.UUID
    user_id: str
    status: Status
    total: int = Field(description="Minor units (cents).")
    currency: str | None = Field(description="ISO 4217; null for a rejected order none of whose products is known.")
    items: list[OrderLine]
    payment: PaymentView
    next_action: dict[str, str] | None = Field(
        default=None, description="What the buyer does next: `client_secret` (Stripe) or `approve_url` (PayPal)."
    )
    shipment: ShipmentView | None = Field(default=None, description="Set once the order has shipped.")
    reason: str | None = None
    created_at: str
    updated_at: str
    paid_at: str | None = Field(default=None, description="When the order was paid (completed).")

    @classmethod
    def of(cls, view: OrderViewData) -> OrderView:
        return cls.model_validate({k: v for k, v in view.items() if k in cls.model_fields})


class CommandRef(BaseModel):
    message_id: str | None
    type: str | None
    correlation_id: str | None


class TransitionEntry(BaseModel):
    at: str
    from_status: str | None
    to_status: str
    reason: str | None
    command: CommandRef


class EventEntry(BaseModel):
    at: str
    event_id: str
    exchange: str
    routing_key: str
    relayed: bool = Field(description="False while the event waits in the outbox for the broker's confirm.")
    caused_by: CommandRef


class PaymentEntry(BaseModel):
    at: str
    status: str
    provider: str
    amount: int
    currency: str
    idempotency_key: str
    provider_payment_id: str | None = None
    capture_id: str | None = None
    refund_id: str | None = None
    attempts: int
    last_error: str | None = None
    caused_by: CommandRef


class RefusalEntry(BaseModel):
    at: str
    command: str | None
    reason: str
    message: str | None
    caused_by: CommandRef


class OrderHistory(BaseModel):
    """Everything the service recorded about an order, oldest first."""

    order: OrderView
    transitions: list[TransitionEntry]
    events: list[EventEntry]
    payments: list[PaymentEntry]
    refusals: list[RefusalEntry]


class WebhookAccepted(BaseModel):
    received: bool = True
    enqueued: bool = Field(description="False for verified events the service does not act on.")
    event_id: str | None = None


class Check(BaseModel):
    postgresql: str
    rabbitmq: str
    redis: str


class RateLimitState(BaseModel):
    mode: Literal["redis", "local"] = Field(
        description="Where limits are enforced: `redis` (shared), or `local` (this process's share) while Redis is unreachable."
    )
    share_of: int = Field(description="The configured limits are divided by this many processes in `local` mode.")


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: Check
    rate_limits: RateLimitState
    error: str | None = None
    message: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
