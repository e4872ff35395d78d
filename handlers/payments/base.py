"""The payment gateway seam.

Handlers talk to payment providers only through :class:`PaymentGateway`, and
so does ``orders reconcile`` (:meth:`PaymentGateway.payments_since`).  Only
the two implementations (``stripe_gateway``, ``paypal_gateway``) and their
client factories (``stripe_client``, ``paypal_client``) import a provider SDK
(``tests/unit/test_sdk_boundary.py`` holds every other module to it).
Every call that can move money takes an idempotency key derived from the
order, so repeating it after a crash or a timeout returns the first answer
instead of charging again.

Errors::

    PaymentError
     ├── TransientPaymentError   timeout, dropped connection, 5xx, 429: retry
     │    ├── OutcomeUnknown     the request may have reached the provider:
     │    │                      settle by repeating with the same key
     │    └── CertificateFetchBusy  too many webhook certificates being fetched
     └── PermanentPaymentError   4xx validation, bad configuration: no retry
          └── PaymentAlreadyCaptured  cancel found the money taken: refund

A card decline is not an error: it is ``PaymentResult(outcome=DECLINED)``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


class PaymentError(Exception):
    """Base of the gateway errors."""


class TransientPaymentError(PaymentError):
    """The provider could not answer now; the same call may succeed later."""


class OutcomeUnknown(TransientPaymentError):
    """The request was sent but no answer came back (timeout, reset)."""


class CertificateFetchBusy(TransientPaymentError):
    """Every slot for fetching a webhook's certificate is in use: refused at once, not queued.

    The certificate URL comes from an unauthenticated sender; the shim answers
    503 with Retry-After, and a real provider redelivers.
    """


class PermanentPaymentError(PaymentError):
    """The provider refused the request itself; repeating it will not help."""


class PaymentAlreadyCaptured(PermanentPaymentError):
    """``cancel`` found the money already taken: refund instead of cancelling.

    Raised by both gateways when the PaymentIntent has succeeded / the PayPal
    order was captured.  The confirmation webhook will also arrive, and a
    confirmation for a cancelled order is refunded (docs/contract.md), so a caller
    may refund at once or leave it to that path.
    """


class WebhookVerificationError(Exception):
    """A webhook's signature, timestamp or certificate did not verify."""


class MalformedWebhook(WebhookVerificationError):
    """A validly signed webhook that is not a provider event this service can read.

    E.g. ``data.object`` a string, an amount that is not a number, an event id
    longer than a message id may be.  Redelivery would not help: answer 400.
    """


class PaymentOutcome(str, enum.Enum):
    SUCCEEDED = "succeeded"  # money taken (Stripe succeeded, PayPal capture COMPLETED)
    REQUIRES_ACTION = "requires_action"  # the buyer must act (3DS, PayPal approval)
    PROCESSING = "processing"  # accepted, result comes by webhook
    DECLINED = "declined"  # card declined / payment refused


@dataclass(frozen=True)
class PaymentRequest:
    order_id: str
    amount: int  # minor units
    currency: str  # ISO 4217, upper case
    idempotency_key: str
    payment_method: str | None = None  # Stripe
    return_url: str | None = None  # PayPal
    cancel_url: str | None = None  # PayPal
    description: str | None = None


@dataclass(frozen=True)
class PaymentResult:
    outcome: PaymentOutcome
    provider_payment_id: str
    #: what the buyer needs next, for the read model:
    #: ``{"client_secret": ...}`` (Stripe) or ``{"approve_url": ...}`` (PayPal)
    next_action: dict[str, str] = field(default_factory=dict)
    decline_reason: str | None = None
    #: PayPal capture id, needed to refund
    capture_id: str | None = None
    provider_status: str | None = None


@dataclass(frozen=True)
class RefundResult:
    refund_id: str
    status: str


@dataclass(frozen=True)
class PaymentFacts:
    """What the provider says about a payment, asked by its id (:meth:`PaymentGateway.lookup`).

    For settling a confirmation that does not match our record, and for
    checking a PayPal capture before a webhook completes an order.
    """

    provider_payment_id: str  # Stripe PaymentIntent id / PayPal order id
    taken: bool  # money taken and not failed (Stripe status succeeded; PayPal capture COMPLETED)
    order_id: str | None  # OUR order id the provider has on it (Stripe metadata order_id; PayPal custom_id)
    amount: (
        int | None
    )  # minor units taken (Stripe amount_received, else amount; PayPal capture amount, else the order's)
    currency: str | None  # upper-case ISO code
    status: str  # the provider's status string ("not_found" for an unknown id)
    capture_id: str | None = None  # PayPal capture id
    #: minor units given back so far: the sum of the payment's refunds that succeeded (Stripe ``succeeded``,
    #: also ``pending``; PayPal ``COMPLETED``, also ``PENDING``), whoever made them (the service or the
    #: provider's dashboard)
    refunded: int = 0
    #: the ids of those refunds, oldest first
    refund_ids: tuple[str, ...] = ()

    @classmethod
    def not_found(cls, provider_payment_id: str) -> PaymentFacts:
        """The provider knows no payment by this id."""
        return cls(
            provider_payment_id=provider_payment_id,
            taken=False,
            order_id=None,
            amount=None,
            currency=None,
            status="not_found",
        )


@dataclass(frozen=True)
class ProviderPayment:
    """One payment as the provider lists it (:meth:`PaymentGateway.payments_since`), with its refunds.

    A Stripe PaymentIntent, or a PayPal capture (not the PayPal order: the
    capture is what Transaction Search lists and what money is refunded from).
    """

    payment_id: str  # PaymentIntent id / capture id
    order_id: str | None  # OUR order id on it: metadata.order_id / custom_id
    taken: bool  # the money was taken (succeeded / capture completed)
    amount: int  # minor units taken
    currency: str  # upper case
    status: str  # the provider's status (Stripe's intent status, Transaction Search's one-letter status)
    refunded: int = 0  # minor units given back
    refund_ids: tuple[str, ...] = ()
    at: datetime | None = None  # its latest change the provider tells of (creation, last refund)

    @property
    def kept(self) -> int:
        """Minor units the provider holds for us."""
        return self.amount - self.refunded if self.taken else 0


class WebhookKind(str, enum.Enum):
    CONFIRMED = "confirmed"  # money taken: becomes PaymentConfirmed
    FAILED = "failed"  # payment failed / denied
    APPROVED = "approved"  # PayPal buyer approved: capture next
    #: money given back at the provider, by the service or in the provider's dashboard: Stripe
    #: ``charge.refunded``, PayPal ``PAYMENT.CAPTURE.REFUNDED``; looked up at the provider before it changes anything
    REFUNDED = "refunded"
    IGNORED = "ignored"  # verified but not an event this service acts on


@dataclass(frozen=True)
class WebhookEvent:
    kind: WebhookKind
    provider: str
    event_id: str
    event_type: str
    order_id: str | None = None
    provider_payment_id: str | None = None
    amount: int | None = None  # minor units (REFUNDED: what the event says was given back; the lookup decides)
    currency: str | None = None
    reason: str | None = None
    #: PayPal capture id: a refund event names the capture it gives money back from (and not the order)
    capture_id: str | None = None


class PaymentGateway(Protocol):
    """One provider.  Implementations are thread-safe."""

    provider: str

    def start(self, request: PaymentRequest) -> PaymentResult:
        """Create (and for Stripe confirm) the payment; idempotent per key."""

    def capture(self, provider_payment_id: str, idempotency_key: str) -> PaymentResult:
        """Capture an approved payment (PayPal); idempotent per key."""

    def cancel(self, provider_payment_id: str, idempotency_key: str) -> None:
        """Cancel a PaymentIntent / void a PayPal order that was not captured."""

    def refund(self, result: PaymentResult, amount: int, currency: str, idempotency_key: str) -> RefundResult:
        """Refund a captured payment in full; idempotent per key."""

    def lookup(self, provider_payment_id: str) -> PaymentFacts:
        """Ask the provider about a payment (a read); an unknown id is ``PaymentFacts.not_found``."""

    def payments_since(self, start: datetime, page_size: int = 100) -> list[ProviderPayment]:
        """Every payment made since ``start`` and every payment refunded since then, each with all its
        refunds (reads only, ``page_size`` records a page; for ``orders reconcile``)."""

    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """Verify the signature and translate; raises WebhookVerificationError (MalformedWebhook for odd shapes)."""
