"""Provider webhooks → verified :class:`WebhookEvent` → PaymentConfirmed command.

The HTTP shim hands the raw body and headers to :func:`parse_webhook`; the
provider is recognised by its signature header (``Stripe-Signature`` or
``PAYPAL-TRANSMISSION-SIG``, any case) and its gateway verifies and
translates.  A ``CONFIRMED`` event becomes the PaymentConfirmed command of
docs/contract.md with :func:`to_payment_confirmed`; the command's AMQP
``message_id`` is the provider's event id (:func:`confirmation_message_id`),
so a redelivered webhook is deduplicated by the worker's inbox.

Every command a webhook becomes is checked against its model
(:mod:`schema.messages`) before anyone publishes it: a signed event whose
fields the worker would refuse (a negative amount, an order id that is not a
UUID, a control character) raises :class:`MalformedWebhook` here (the shim
answers 400 ``invalid_webhook``) instead of being accepted and then
dead-lettered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from handlers.payments.base import (
    MalformedWebhook,
    PaymentGateway,
    WebhookEvent,
    WebhookKind,
    WebhookVerificationError,
)
from schema.messages import (
    CapturePayment,
    Command,
    PaymentConfirmed,
    PaymentFailed,
    SettleRefund,
    describe_validation_error,
)
from schema.topology import route

#: control characters (the rule of schema.messages.Text): a provider's free-text reason loses them
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_SIGNATURE_HEADERS = {"stripe-signature": "stripe", "paypal-transmission-sig": "paypal"}


def detect_provider(headers: Mapping[str, str]) -> str:
    """``"stripe"`` or ``"paypal"`` from the signature header; else WebhookVerificationError."""
    found = {_SIGNATURE_HEADERS[k.lower()] for k in headers if k.lower() in _SIGNATURE_HEADERS}
    if len(found) != 1:
        raise WebhookVerificationError("webhook has no (or more than one) provider signature header")
    return found.pop()


def parse_webhook(gateways: Mapping[str, PaymentGateway], body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
    """Verify a webhook with the right gateway and translate it.

    Raises :class:`WebhookVerificationError` when no provider is recognised or
    the signature does not verify (answer 400); PayPal may raise
    ``TransientPaymentError`` when its certificate cannot be fetched (answer
    5xx so the provider redelivers).
    """
    provider = detect_provider(headers)
    gateway = gateways.get(provider)
    if gateway is None:
        raise WebhookVerificationError(f"no gateway configured for {provider}")
    return gateway.parse_webhook(body, headers)


def to_payment_confirmed(event: WebhookEvent) -> dict[str, Any]:
    """The PaymentConfirmed command body for a ``CONFIRMED`` event.

    ``{order_id, provider, payment_id, amount, currency, event_id}``; raises
    ``ValueError`` for other kinds or when a field is missing (e.g. a PayPal
    capture without our ``custom_id``): such an event cannot be applied.
    """
    if event.kind is not WebhookKind.CONFIRMED:
        raise ValueError(f"only confirmed payments become PaymentConfirmed, not {event.kind.value}")
    body = {
        "order_id": event.order_id,
        "provider": event.provider,
        "payment_id": event.provider_payment_id,
        "amount": event.amount,
        "currency": event.currency,
        "event_id": event.event_id,
    }
    missing = sorted(k for k, v in body.items() if v in (None, ""))
    if missing:
        raise ValueError(f"{event.provider} event {event.event_id} lacks {', '.join(missing)}")
    return body


def confirmation_message_id(event: WebhookEvent) -> str:
    """AMQP ``message_id`` of the PaymentConfirmed command: the provider's event id."""
    return event.event_id


__all__ = ["confirmation_message_id", "detect_provider", "parse_webhook", "to_payment_confirmed"]


@dataclass(frozen=True)
class WebhookCommand:
    """What a verified webhook asks the service to do: one command to publish on its route."""

    command: type[Command]
    message_id: str
    body: dict[str, Any]

    @property
    def exchange(self) -> str:
        return route(self.command).exchange

    @property
    def routing_key(self) -> str:
        return route(self.command).routing_key

    @property
    def message_type(self) -> str:
        return route(self.command).message_type

    def as_dict(self) -> dict[str, Any]:
        return {
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "message_type": self.message_type,
            "message_id": self.message_id,
            "body": self.body,
        }


def to_command(event: WebhookEvent) -> WebhookCommand | None:
    """The command a verified webhook becomes, or None for events not acted on.

    Confirmed → PaymentConfirmed (public ``orders.commands``); PayPal approval
    → the internal CapturePayment; a failure → the internal PaymentFailed; a
    refund → the internal SettleRefund (once the event names its order and
    the order's payment: a refund event names neither, so the shim finds them
    first, see ``worker/shim/webhook.py``).
    The message id is the provider's event id, so a webhook delivered three
    times is applied once.  Raises :class:`MalformedWebhook` when the command
    would not pass its model (the worker would dead-letter it), and
    ``ValueError`` when a confirmation lacks a field.
    """
    if event.kind is WebhookKind.IGNORED or event.order_id is None:
        return None
    if event.kind is WebhookKind.REFUNDED:
        if not event.provider_payment_id:
            return None  # the shim names the payment first (refund_owner); without one it is not ours
        body = {
            "order_id": event.order_id,
            "provider": event.provider,
            "payment_id": event.provider_payment_id,
            "event_id": event.event_id,
        }
        return _checked(WebhookCommand(SettleRefund, event.event_id, body))
    if event.kind is WebhookKind.CONFIRMED:
        return _checked(WebhookCommand(PaymentConfirmed, confirmation_message_id(event), to_payment_confirmed(event)))
    common = {
        "order_id": event.order_id,
        "provider": event.provider,
        "payment_id": event.provider_payment_id or "",
        "event_id": event.event_id,
    }
    if event.kind is WebhookKind.APPROVED:
        return _checked(WebhookCommand(CapturePayment, event.event_id, common))
    reason = _CONTROL.sub(" ", event.reason or "").strip()[:1000] or None
    return _checked(WebhookCommand(PaymentFailed, event.event_id, {**common, "reason": reason} if reason else common))


def _checked(webhook: WebhookCommand) -> WebhookCommand:
    """``webhook`` once its body passes the command's model, as the worker will read it."""
    try:
        webhook.command.model_validate_json(json.dumps(webhook.body))
    except ValidationError as exc:
        raise MalformedWebhook(
            f"the event makes an invalid {webhook.command.__name__}: {describe_validation_error(exc)}"[:500]
        ) from None
    return webhook
