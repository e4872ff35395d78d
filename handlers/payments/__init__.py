"""Payment gateways: Stripe and PayPal behind :class:`base.PaymentGateway`.

``build_gateways(settings)`` makes one gateway per provider; the provider SDKs
are imported only when a gateway is built, so modules that only need the
types (``base``) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.payments.base import PaymentGateway, PermanentPaymentError

if TYPE_CHECKING:
    from worker.settings import Settings


class PaymentAlreadyCaptured(PermanentPaymentError):
    """``cancel`` found the money already taken: refund instead of cancelling.

    Raised by both gateways when the PaymentIntent has succeeded / the PayPal
    order was captured.  The confirmation webhook will also arrive, and a
    confirmation for a cancelled order is refunded (DESIGN.md), so a caller
    may refund at once or leave it to that path.
    """


def build_gateways(settings: "Settings") -> dict[str, PaymentGateway]:
    """One gateway per provider, keyed ``"stripe"`` and ``"paypal"``."""
    from handlers.payments.paypal_gateway import PayPalGateway
    from handlers.payments.stripe_gateway import StripeGateway

    return {"stripe": StripeGateway(settings.stripe), "paypal": PayPalGateway(settings.paypal)}


__all__ = ["PaymentAlreadyCaptured", "build_gateways"]
