"""Payment gateways: Stripe and PayPal behind :class:`base.PaymentGateway`.

``build_gateways(settings)`` makes one gateway per provider; the provider SDKs
are imported only when a gateway is built, so modules that only need the
types (``base``) stay light.
"""

from __future__ import annotations

from typing import Protocol

from handlers.payments.base import PaymentAlreadyCaptured, PaymentGateway
from handlers.payments.settings import PayPalSettings, StripeSettings


class HasGatewaySettings(Protocol):
    """Anything with the two gateway sections (the service's settings)."""

    @property
    def stripe(self) -> StripeSettings: ...

    @property
    def paypal(self) -> PayPalSettings: ...


def build_gateways(settings: HasGatewaySettings) -> dict[str, PaymentGateway]:
    """One gateway per provider, keyed ``"stripe"`` and ``"paypal"``."""
    from handlers.payments.paypal_gateway import PayPalGateway
    from handlers.payments.stripe_gateway import StripeGateway

    return {"stripe": StripeGateway(settings.stripe), "paypal": PayPalGateway(settings.paypal)}


__all__ = ["PaymentAlreadyCaptured", "build_gateways"]
