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

import textwrap
from collections.abc import Mapping
from typing import Any, NoReturn

import stripe
import urllib3
from requests.utils import get_environ_proxies
from stripe import APIConnectionError

from handlers.payments.settings import StripeSettings

#: the most connections kept open to the API, shared by every thread of the process: one per call in
#: flight (``worker.payment_concurrency``, 64 by default), opened when first needed
POOL_SIZE = 256


class Urllib3Client(stripe.HTTPClient):
    """The SDK's HTTP through one ``urllib3.PoolManager``, shared by every thread (it is thread-safe).

    ``stripe.RequestsClient`` makes a ``requests.Session`` per thread and sends every request through its
    whole machinery: hooks, cookies, redirects and, per request, the environment's proxies and
    ``~/.netrc``: 829 µs of CPU per PaymentIntent create through the SDK on a 2-core bench machine,
    against 475 µs through this client (``scripts/bench_stripe_http.py``, medians of 5 alternating
    rounds).  The environment's proxy for the API's address (``HTTPS_PROXY``, ``NO_PROXY``, ...) is
    read once, when the client is made.  The SDK keeps its own retries (with the same idempotency
    key), so urllib3's are off; what it is told is what ``RequestsClient`` tells it: a timeout or a
    dropped connection may be retried, a certificate that does not verify may not.
    """

    name = "urllib3"

    def __init__(self, api_base: str, timeout: float, pool_size: int = POOL_SIZE) -> None:
        super().__init__()
        options: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": pool_size,
            "timeout": urllib3.Timeout(connect=timeout, read=timeout),
            "retries": False,
            "cert_reqs": "CERT_REQUIRED",
            "ca_certs": stripe.ca_bundle_path,
        }
        proxies = get_environ_proxies(api_base)  # {} when NO_PROXY names the address
        proxy = proxies.get(api_base.split(":", 1)[0].lower()) or proxies.get("all")
        self._pool: urllib3.PoolManager = (
            urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        )

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        response = self._send(method, url, headers, post_data, preload=True)
        return response.data, response.status, response.headers

    def request_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        response = self._send(method, url, headers, post_data, preload=False)
        return response, response.status, response.headers

    def _send(
        self, method: str, url: str, headers: Mapping[str, str] | None, body: Any, preload: bool
    ) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request(
                method.upper(), url, body=body, headers=dict(headers or {}), redirect=False, preload_content=preload
            )
        except urllib3.exceptions.HTTPError as exc:
            self._handle_request_error(exc)

    def _handle_request_error(self, exc: urllib3.exceptions.HTTPError) -> NoReturn:
        retry = not isinstance(exc, urllib3.exceptions.SSLError) and isinstance(
            exc,
            (
                urllib3.exceptions.TimeoutError,
                urllib3.exceptions.ProtocolError,
                urllib3.exceptions.NewConnectionError,
                urllib3.exceptions.ProxyError,
            ),
        )
        message = textwrap.fill(
            "Unexpected error communicating with Stripe.  If this problem persists, let us know at support@stripe.com."
        )
        raise APIConnectionError(  # type: ignore[no-untyped-call]
            f"{message}\n\n(Network error: {type(exc).__name__}: {exc})", should_retry=retry
        ) from exc

    def close(self) -> None:
        self._pool.clear()


def stripe_client(settings: StripeSettings) -> stripe.StripeClient:
    """A ``StripeClient`` with the service's base URL, timeout and retries (thread-safe: one per gateway)."""
    return stripe.StripeClient(
        settings.api_key.get_secret_value(),
        base_addresses={"api": settings.api_base},
        max_network_retries=settings.max_network_retries,
        http_client=Urllib3Client(settings.api_base, settings.timeout_seconds),
    )


__all__ = ["Urllib3Client", "stripe_client"]
