"""``POST /orders/payment-confirmation``: verified webhooks become commands.

Stripe and PayPal are verified by :mod:`handlers.payments.webhooks` (their
signature headers).  An internal payment service signs instead with the
shared ``shim.webhook_hmac_secret``: header
``X-Orders-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``,
body a PaymentConfirmed command (provider ``internal``); the timestamp must
be within ``shim.webhook_tolerance_seconds`` so a captured request cannot be
replayed later (a replay inside the window is a duplicate the inbox drops).

A provider webhook that does not verify answers 400 ``invalid_signature``; one
that verifies but is not a readable event (odd shapes, JSON nested too deeply,
an event id longer than an AMQP message id may be), or whose command would
not pass its model (a negative amount, an order id that is not a UUID, a
control character), answers 400 ``invalid_webhook`` and is never published.
A PayPal webhook whose certificate would need fetching while every fetch
slot is taken answers 503 ``overloaded`` with Retry-After at once.

A refund event (Stripe ``charge.refunded``, PayPal ``PAYMENT.CAPTURE.REFUNDED``)
names the PaymentIntent or the capture, not our order: the order is found by
that payment in the service's own records (:func:`refund_owner`).  One the
records do not know is answered 503, so the provider redelivers it once the
payment is recorded (a refund made in the seconds after a capture); a Stripe
PaymentIntent whose metadata names no order of ours is not ours (200, not
enqueued).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from collections.abc import Mapping

import structlog
from pydantic import ValidationError
from sqlalchemy import Engine, select

from handlers.payments.base import (
    CertificateFetchBusy,
    MalformedWebhook,
    PaymentGateway,
    TransientPaymentError,
    WebhookEvent,
    WebhookKind,
    WebhookVerificationError,
)
from handlers.payments.webhooks import WebhookCommand, parse_webhook, to_command
from schema import tables
from schema.messages import PaymentConfirmed, describe_validation_error
from worker.settings import ShimSettings
from worker.shim.errors import ApiError
from worker.shim.publisher import Envelope

log = structlog.get_logger("worker.shim.webhook")

INTERNAL_HEADER = "x-orders-signature"
#: seconds a webhook refused for want of a certificate fetch slot is told to wait
CERT_BUSY_RETRY_AFTER = 5


def sign_internal(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Orders-Signature`` value for ``body`` (for the internal service and tests)."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_signature", message)


def _internal_command(cfg: ShimSettings, body: bytes, header: str) -> Envelope:
    secret = cfg.webhook_hmac_secret.get_secret_value()
    if not secret:
        raise _invalid("internal webhooks are not enabled")
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts.get("t", ""))
    except ValueError:
        raise _invalid("malformed X-Orders-Signature") from None
    if abs(time.time() - t) > cfg.webhook_tolerance_seconds:
        raise _invalid("signature timestamp outside the tolerance")
    if not hmac.compare_digest(sign_internal(secret, body, t), f"t={t},v1={parts.get('v1', '')}"):
        raise _invalid("signature does not match")
    try:
        cmd = PaymentConfirmed.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError(422, "validation_error", describe_validation_error(exc)) from None
    return Envelope.on_route(PaymentConfirmed, cmd.event_id, cmd.model_dump(mode="json"))


def refund_owner(engine: Engine, event: WebhookEvent) -> tuple[str, str] | None:
    """(our order id, the order's payment id as recorded) of the payment a refund event names, or None."""
    p = tables.payments
    column = p.c.capture_id if event.provider_payment_id is None else p.c.provider_payment_id
    key = event.capture_id if event.provider_payment_id is None else event.provider_payment_id
    if not key:
        return None
    query = select(p.c.order_id, p.c.provider_payment_id).where(column == key, p.c.provider == event.provider)
    with engine.connect() as conn:
        row = conn.execute(query.limit(1)).first()
    return (str(row.order_id), str(row.provider_payment_id)) if row and row.provider_payment_id else None


def _with_owner(engine: Engine | None, event: WebhookEvent) -> WebhookEvent | None:
    """The refund event with its order and payment named; None when it is not ours."""
    found = refund_owner(engine, event) if engine is not None else None
    if found is not None:
        return dataclasses.replace(event, order_id=found[0], provider_payment_id=found[1])
    if event.provider == "stripe" and event.order_id is None:
        return None  # a PaymentIntent of ours carries our order id: without one it was made elsewhere
    raise ApiError(
        503,
        "payment_not_recorded",
        "this refund names a payment the service has not recorded (yet); redeliver later",
        {"Retry-After": "60"},
    )


def to_publish(
    cfg: ShimSettings,
    gateways: Mapping[str, PaymentGateway],
    body: bytes,
    headers: Mapping[str, str],
    engine: Engine | None = None,
) -> tuple[str | None, Envelope | None]:
    """(event id, command to publish or None) for a webhook; 400/503 ApiError when it cannot be trusted."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if INTERNAL_HEADER in lowered:
        cmd = _internal_command(cfg, body, lowered[INTERNAL_HEADER])
        return cmd.message_id, cmd
    try:
        event = parse_webhook(gateways, body, lowered)
        if event.kind is WebhookKind.REFUNDED:
            owned = _with_owner(engine, event)
            if owned is None:
                log.info("refund of a payment that is not ours", event_id=event.event_id, provider=event.provider)
                return event.event_id, None
            event = owned
        webhook = _command_of(event)
    except MalformedWebhook as exc:
        # signed, so the provider's (or its key's holder's): worth a look, but redelivery will not help
        log.warning("signed webhook is not a readable event", reason=str(exc))
        raise ApiError(
            400, "invalid_webhook", "the webhook is signed but is not an event this service can read"
        ) from None
    except WebhookVerificationError as exc:
        log.info("webhook rejected", reason=str(exc))
        raise _invalid("the webhook signature did not verify") from None
    except CertificateFetchBusy:
        raise ApiError(
            503,
            "overloaded",
            f"too many webhook certificates being fetched; retry after {CERT_BUSY_RETRY_AFTER} s",
            {"Retry-After": str(CERT_BUSY_RETRY_AFTER)},
        ) from None
    except TransientPaymentError:
        raise ApiError(
            503, "provider_unavailable", "could not verify the webhook now; redeliver later", {"Retry-After": "30"}
        ) from None
    if webhook is None:
        return event.event_id, None
    return event.event_id, Envelope.on_route(webhook.command, webhook.message_id, webhook.body)


def _command_of(event: WebhookEvent) -> WebhookCommand | None:
    """The command to publish for a verified event; None for one not acted on, or one that cannot be."""
    try:
        return to_command(event)
    except ValueError as exc:
        # verified but unusable (e.g. no order id): redelivery would not help; operators must look
        log.error("verified webhook cannot be applied", event_id=event.event_id, reason=str(exc))
        return None
