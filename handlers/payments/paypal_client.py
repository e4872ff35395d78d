"""The PayPal SDK client, built from the ``paypal`` settings: the one place its policy is set.

:class:`~handlers.payments.paypal_gateway.PayPalGateway` (the payment step,
the webhooks' postback verification, ``orders reconcile`` through
``payments_since``) gets its client here: every request goes to
``paypal.base_url`` (the real API or the local fake), waits at most
``paypal.timeout_seconds``, and is retried at most
``paypal.max_network_retries`` times on :data:`RETRY_STATUSES` for
:data:`RETRY_METHODS`, OAuth client credentials from the settings.

PayPal's webhook certificates are not fetched through this client (the
gateway fetches them with httpx, trusting ``paypal.cert_ca_file``): that trust
is the gateway's.  A module of its own rather than one ``clients.py`` for both
providers, so that the PayPal gateway never imports the Stripe SDK (see
:mod:`handlers.payments.stripe_client`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paypalserversdk.configuration import Configuration, Server
from paypalserversdk.http.auth.o_auth_2 import ClientCredentialsAuthCredentials, OAuth2
from paypalserversdk.models.o_auth_token import OAuthToken
from paypalserversdk.paypal_serversdk_client import PaypalServersdkClient

from handlers.payments.settings import PayPalSettings

#: answers retried (the SDK's default also retries 408, 413 and Cloudflare's 52x)
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: methods retried.  POST is safe to retry: every mutating call carries ``PayPal-Request-Id``,
#: and a repeated token request is harmless
RETRY_METHODS = ("GET", "POST", "PUT")
#: the backoff factor of the SDK's urllib3 ``Retry``: the waits between tries grow from it, doubling
BACKOFF_FACTOR = 0.5

#: fetches an access token: (the last token or None, the SDK's OAuth2 manager) → a new token
TokenProvider = Callable[[OAuthToken | None, OAuth2], OAuthToken]


class _BaseUrlConfiguration(Configuration):  # type: ignore[misc]  # the PayPal SDK ships no types
    """The SDK's Configuration with its base URL taken from our settings.

    The SDK only knows its PRODUCTION and SANDBOX URLs; this override is the
    one place where ``settings.base_url`` (the real API or the local fake)
    gets in.  Beware: ``Configuration.clone_with()`` builds a plain
    ``Configuration`` and ``from_environment()`` additionally reads ``.env``
    and ``ENVIRONMENT``; both silently lose this base URL, so never use them
    on this object.
    """

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        self._base_url = base_url.rstrip("/")
        super().__init__(**kwargs)

    def get_base_uri(self, server: Server = Server.DEFAULT) -> str:
        return self._base_url


def paypal_client(settings: PayPalSettings, token_provider: TokenProvider | None = None) -> PaypalServersdkClient:
    """A ``PaypalServersdkClient`` with the service's base URL, timeout, retries and credentials.

    ``token_provider`` replaces the SDK's own token fetching (which swallows a
    token request's error into an opaque auth failure); None keeps the SDK's.
    """
    return PaypalServersdkClient(
        config=_BaseUrlConfiguration(
            settings.base_url,
            timeout=settings.timeout_seconds,
            max_retries=settings.max_network_retries,
            backoff_factor=BACKOFF_FACTOR,
            retry_statuses=list(RETRY_STATUSES),
            retry_methods=list(RETRY_METHODS),
            client_credentials_auth_credentials=ClientCredentialsAuthCredentials(
                o_auth_client_id=settings.client_id,
                o_auth_client_secret=settings.client_secret.get_secret_value(),
                o_auth_token_provider=token_provider,
            ),
        )
    )


__all__ = ["BACKOFF_FACTOR", "RETRY_METHODS", "RETRY_STATUSES", "TokenProvider", "paypal_client"]
