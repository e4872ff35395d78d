"""The Stripe SDK client, built from the ``stripe`` settings: the one place its policy is set.

:class:`~handlers.payments.stripe_gateway.StripeGateway` (the payment step,
the webhooks, ``orders reconcile`` through ``payments_since``) gets its
client here, so every Stripe request the service makes goes to
``stripe.api_base`` (the real API, or the local fake), waits at most
``stripe.timeout_seconds`` and is retried by the SDK at most
``stripe.max_network_retries`` times (the SDK retries connection errors, 409
and 5xx, or what a ``Stripe-Should-Retry`` header says, with backoff, sending
the same idempotency key again).

A module of its own rather than one ``clients.py`` for both providers: the
Stripe gateway then never imports the PayPal SDK (each costs a few hundred
milliseconds to import), as :func:`handlers.payments.build_gateway` builds
only the gateway it is asked for.
"""

from __future__ import annotations

import stripe

from handlers.payments.settings import StripeSettings


def stripe_client(settings: StripeSettings) -> stripe.StripeClient:
    """A ``StripeClient`` with the service's base URL, timeout and retries (thread-safe: one per gateway)."""
    return stripe.StripeClient(
        settings.api_key.get_secret_value(),
        base_addresses={"api": settings.api_base},
        max_network_retries=settings.max_network_retries,
        http_client=stripe.RequestsClient(timeout=settings.timeout_seconds),
    )


__all__ = ["stripe_client"]
