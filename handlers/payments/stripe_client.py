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

import functools
import http.client
import logging
import socket
import ssl
import sys
import textwrap
import threading
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, cast
from urllib.parse import urlsplit

import stripe
import stripe._api_requestor
import urllib3
from requests.utils import get_environ_proxies
from stripe import APIConnectionError
from urllib3.util.wait import wait_for_read

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
        raise _network_error(exc, retry) from exc

    def close(self) -> None:
        self._pool.clear()


def _network_error(exc: BaseException, retry: bool) -> APIConnectionError:
    message = textwrap.fill(
        "Unexpected error communicating with Stripe.  If this problem persists, let us know at support@stripe.com."
    )
    return APIConnectionError(  # type: ignore[no-untyped-call]
        f"{message}\n\n(Network error: {type(exc).__name__}: {exc})", should_retry=retry
    )


class ThreadConnectionClient(stripe.HTTPClient):
    """The SDK's HTTP through the standard library's ``http.client``: one kept-alive connection per thread.

    What :class:`Urllib3Client` does for a request, less its pool's machinery (the pool's queue and lock,
    URL parsing, a header dictionary of its own, a response object around ``http.client``'s): a
    PaymentIntent create through the SDK cost 676 µs of CPU through urllib3, 354 through this client with
    the SDK's log lines quieted (:func:`quiet_sdk_logging`; ``scripts/bench_stripe_http.py``).  Each thread of
    the call pool keeps its own connection (a payment call is made by one thread from start to end), so
    no lock is taken.  Like urllib3, a kept connection is looked at before it is used again: one the server
    closed meanwhile (or that has anything unasked for to read) is closed and a new one made, so a request
    is not sent into a connection that is gone.  TLS verifies the certificate and the host name against the
    SDK's CA bundle.  What the SDK is told on a failure is what :class:`Urllib3Client` tells it: a refused
    or dropped connection or a timeout may be retried (with the same idempotency key), a TLS failure not.

    Used when no proxy applies to the API's address and urllib3 is not traced (see :func:`http_client`).
    """

    name = "http.client"

    def __init__(self, api_base: str, timeout: float) -> None:
        super().__init__()
        parts = urlsplit(api_base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"stripe api_base {api_base!r} is not an http(s) URL")
        self._host = parts.hostname
        self._port = parts.port
        self._timeout = timeout
        self._context = ssl.create_default_context(cafile=stripe.ca_bundle_path) if parts.scheme == "https" else None
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and _dropped(conn.sock):
            conn.close()  # closed by the server while it was kept (or it sent what nobody asked for)
        if conn is None:
            if self._context is not None:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._context)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
        return conn  # a closed one connects again on its next request

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = post_data.encode() if isinstance(post_data, str) else post_data
        conn = self._connection()
        try:
            conn.request(method.upper(), target, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            content = response.read()
        except ssl.SSLError as exc:  # a certificate that does not verify: never retried
            conn.close()
            raise _network_error(exc, retry=False) from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, dropped mid-answer
            conn.close()
            raise _network_error(exc, retry=True) from exc
        # an ``http.client.HTTPMessage``: looked up ignoring case, as the SDK looks its headers up
        return content, response.status, cast(Mapping[str, str], response.headers)

    def request_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        # no call of the service streams; read whole, as a stream of one chunk
        content, status, response_headers = self.request(method, url, headers, post_data)
        return _Body(content), status, response_headers

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


class _Body:
    """A read body as the SDK reads a stream."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    def read(self, amount: int | None = None) -> bytes:
        content, self._content = self._content, b""
        return content

    def close(self) -> None:
        pass


def _dropped(sock: socket.socket) -> bool:
    """Whether a kept connection has something to read before anything was asked: its end of file (the
    server closed it) or bytes nobody asked for; either way it cannot carry a request (urllib3's test, with
    its ``poll``: ``select`` cannot take a descriptor above 1023)."""
    try:
        return wait_for_read(sock, timeout=0.0)
    except OSError:
        return True


def _quiet_unless_logged(log: Callable[..., None], level: int) -> Callable[..., None]:
    """The SDK's ``log_info``/``log_debug``, called only when their line goes somewhere.

    The SDK formats every request's log lines (the request, its form body, the answer), then hands them to
    the ``stripe`` logger, which drops them unless it is set to that level (``logs.configure`` sets the
    standard library's loggers to WARNING), or prints them when ``stripe.log`` (or ``STRIPE_LOG``) asks:
    556 → 469 µs of CPU per PaymentIntent create through urllib3, quieted or not, timed alternating in one
    process (2026-12-07), for lines nobody reads.  Whoever sets the
    ``stripe`` logger to INFO or DEBUG, or ``stripe.log``, gets every line as before.
    """
    logger = logging.getLogger("stripe")
    wanted = ("debug",) if level == logging.DEBUG else ("debug", "info")

    @functools.wraps(log)
    def quiet(message: str, **params: Any) -> None:
        if logger.isEnabledFor(level) or stripe._util._console_log_level() in wanted:  # type: ignore[no-untyped-call]
            log(message, **params)

    quiet.__wrapped_sdk_log__ = log  # type: ignore[attr-defined]
    return quiet


def quiet_sdk_logging() -> None:
    """Make the SDK's request log lines cost nothing when nobody reads them (idempotent)."""
    requestor = stripe._api_requestor
    for name, level in (("log_info", logging.INFO), ("log_debug", logging.DEBUG)):
        log = getattr(requestor, name, None)
        if log is not None and not hasattr(log, "__wrapped_sdk_log__"):
            setattr(requestor, name, _quiet_unless_logged(log, level))


def _urllib3_traced() -> bool:
    """Whether OpenTelemetry instruments urllib3 in this process (:func:`worker.tracing.install`)."""
    module = sys.modules.get("opentelemetry.instrumentation.urllib3")
    return bool(module is not None and module.URLLib3Instrumentor().is_instrumented_by_opentelemetry)


def http_client(api_base: str, timeout: float) -> stripe.HTTPClient:
    """The HTTP client for ``api_base``: :class:`ThreadConnectionClient`, or :class:`Urllib3Client` when a proxy
    of the environment applies to the address (urllib3 speaks to proxies) or the process is traced (its
    requests are then spans, under the payment call's)."""
    proxies = get_environ_proxies(api_base)  # {} when NO_PROXY names the address
    if proxies or _urllib3_traced():
        return Urllib3Client(api_base, timeout)
    return ThreadConnectionClient(api_base, timeout)


def stripe_client(settings: StripeSettings) -> stripe.StripeClient:
    """A ``StripeClient`` with the service's base URL, timeout and retries (thread-safe: one per gateway)."""
    quiet_sdk_logging()
    return stripe.StripeClient(
        settings.api_key.get_secret_value(),
        base_addresses={"api": settings.api_base},
        max_network_retries=settings.max_network_retries,
        http_client=http_client(settings.api_base, settings.timeout_seconds),
    )


__all__ = ["ThreadConnectionClient", "Urllib3Client", "http_client", "quiet_sdk_logging", "stripe_client"]
