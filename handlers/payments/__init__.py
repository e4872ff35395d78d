"""Payment gateways: Stripe and PayPal behind :class:`base.PaymentGateway`.

``build_gateways(settings)`` makes one gateway per provider, ``build_gateway``
the one a caller names; the provider SDKs are imported only when a gateway is
built (each gateway its own: ``stripe_client``, ``paypal_client`` build the
SDK clients), so modules that only need the types (``base``) stay light.
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


def build_gateway(settings: HasGatewaySettings, provider: str) -> PaymentGateway:
    """The gateway of ``provider`` (``"stripe"`` or ``"paypal"``), importing only its SDK."""
    if provider == "stripe":
        from handlers.payments.stripe_gateway import StripeGateway

        return StripeGateway(settings.stripe)
    if provider == "paypal":
        from handlers.payments.paypal_gateway import PayPalGateway

        return PayPalGateway(settings.paypal)
    raise ValueError(f"unknown provider {provider!r}")


def build_gateways(settings: HasGatewaySettings) -> dict[str, PaymentGateway]:
    """One gateway per provider, keyed ``"stripe"`` and ``"paypal"``."""
    return {provider: build_gateway(settings, provider) for provider in ("stripe", "paypal")}


__all__ = ["PaymentAlreadyCaptured", "build_gateway", "build_gateways"]
