"""PayPal through ``paypal-server-sdk`` (Orders v2, intent CAPTURE).

The client comes from :func:`handlers.payments.paypal_client.paypal_client`
(base URL, timeout, retries, credentials), with this gateway's token fetching;
:meth:`PayPalGateway.payments_since` reads Transaction Search for ``orders
reconcile``.

Flow: :meth:`PayPalGateway.start` creates the order (``REQUIRES_ACTION`` with
the buyer's ``approve_url``); the buyer approves at PayPal
(``CHECKOUT.ORDER.APPROVED`` webhook); :meth:`PayPalGateway.capture` takes
the money (``PAYMENT.CAPTURE.COMPLETED``).  Every mutating call carries an
explicit ``PayPal-Request-Id``, so retries replay PayPal's first answer.

Cancel: Orders v2 has no void for a CAPTURE-intent order that was not
captured (void exists only for AUTHORIZE-intent authorizations).  Such an
order simply expires unused at PayPal, and it is never captured because our
order is cancelled first.  So :meth:`PayPalGateway.cancel` only checks that
nothing was captured (``PaymentAlreadyCaptured`` otherwise: refund instead).

Webhooks are verified offline as PayPal documents: the certificate comes
from ``PAYPAL-CERT-URL``, which is fetched only over https, only from a host
on ``cert_host_allowlist`` (PayPal's certificate hosts) and only on port 443
(or the port an allow-list entry names), never following a redirect;
anything else is refused before any connection is made (the header is the
sender's: it must not make us probe other hosts or ports, nor tell them
apart by how long the answer takes).  The header comes before any signature
was checked, so fetching is bounded: at most :data:`CERT_FETCHES_IN_FLIGHT`
fetches at once per process (beyond that :class:`CertificateFetchBusy` at
once, never a wait), a fetch that failed is not tried again for
:data:`CERT_FAILURE_TTL_SECONDS` (by URL; a host that could not be reached
or timed out, by host and port), and a whole fetch takes at most
``timeout_seconds`` plus one read.  The PEM
there (the signing certificate, then any intermediates) is accepted only when
``cryptography.x509.verification`` builds a chain from it to a root in
``cert_ca_file`` (the system's CAs when empty; the same roots verify the https
connection), valid now, for ``messageverificationcerts.paypal.com`` or its
sandbox name.  Then SHA256withRSA over
``transmission_id|transmission_time|webhook_id|crc32(body)``.  With
``verification: postback`` PayPal's ``verify-webhook-signature`` is asked
instead (at ``base_url``; the certificate URL is not fetched).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import threading
import time
import warnings
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import httpx
import requests
from apimatic_core.exceptions.auth_validation_exception import AuthValidationException
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from paypalserversdk.api_helper import APIHelper
from paypalserversdk.exceptions.api_exception import ApiException
from paypalserversdk.http.auth.o_auth_2 import OAuth2
from paypalserversdk.models.amount_with_breakdown import AmountWithBreakdown
from paypalserversdk.models.checkout_payment_intent import CheckoutPaymentIntent
from paypalserversdk.models.money import Money
from paypalserversdk.models.o_auth_token import OAuthToken
from paypalserversdk.models.order_request import OrderRequest
from paypalserversdk.models.payment_source import PaymentSource
from paypalserversdk.models.paypal_experience_user_action import PaypalExperienceUserAction
from paypalserversdk.models.paypal_wallet import PaypalWallet
from paypalserversdk.models.paypal_wallet_experience_context import PaypalWalletExperienceContext
from paypalserversdk.models.purchase_unit_request import PurchaseUnitRequest
from paypalserversdk.models.refund_request import RefundRequest

from handlers.payments.base import (
    CertificateFetchBusy,
    MalformedWebhook,
    OutcomeUnknown,
    PaymentAlreadyCaptured,
    PaymentFacts,
    PaymentOutcome,
    PaymentRequest,
    PaymentResult,
    PermanentPaymentError,
    ProviderPayment,
    RefundResult,
    TransientPaymentError,
    WebhookEvent,
    WebhookKind,
    WebhookVerificationError,
)
from handlers.payments.money import MoneyError, from_decimal_string, to_paypal_value
from handlers.payments.paypal_client import paypal_client
from handlers.payments.settings import GatewayConfigError, PayPalSettings, cert_origins
from handlers.payments.shapes import EventId, Ref, Shape, read
from schema.messages import MAX_MESSAGE_ID

log = logging.getLogger(__name__)

PROVIDER = "paypal"
#: Subject names of PayPal's webhook signing certificates.
PAYPAL_CERT_NAMES = ("messageverificationcerts.paypal.com", "messageverificationcerts.sandbox.paypal.com")
#: Largest certificate response read (PayPal's PEM chain is a few KiB).
MAX_CERT_BYTES = 64 * 1024
#: Certificates kept, per URL (PayPal rotates them rarely; each URL names one for good).
CERT_CACHE_SIZE = 32
#: Certificate fetches one process makes at once.  The URL is chosen by an unauthenticated sender: each
#: fetch holds a thread of the shim's pool for up to ``timeout_seconds``, so only a few may (PayPal's
#: real certificates are fetched once each and then cached, so a few is plenty).
CERT_FETCHES_IN_FLIGHT = 4
#: How long a failed fetch is remembered (and its failure answered again without a connection).
CERT_FAILURE_TTL_SECONDS = 60.0
#: Failed URLs and hosts remembered at most (the oldest is forgotten first).
CERT_FAILURE_CACHE_SIZE = 1024
#: capture statuses of money taken: a refund (in part or in full) does not undo the taking
_TAKEN = frozenset({"COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED"})
#: refund statuses whose money is given back (or on its way): ``FAILED`` and ``CANCELLED`` ones are not
_GIVING_BACK = frozenset({"COMPLETED", "PENDING"})
#: the path of a refund's ``up`` link: the capture it gives money back from
_CAPTURE_PATH = re.compile(r"/v2/payments/captures/([A-Za-z0-9_-]+)/?$")
#: Transaction Search's longest date range
SEARCH_WINDOW = timedelta(days=31)
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)

_T = TypeVar("_T")
_S = TypeVar("_S", bound=Shape)


def _describe(exc: ApiException) -> str:
    """Log- and exception-safe description (status, PayPal name, issue, debug id)."""
    parts = [f"paypal http {exc.response_code}"]
    for attr in ("name", "error"):  # ErrorException has name, OAuthProviderException error
        value = getattr(exc, attr, None)
        if value:
            parts.append(str(getattr(value, "value", value)))
    issue = _issue(exc)
    if issue:
        parts.append(issue)
    if getattr(exc, "debug_id", None):
        parts.append(f"debug_id {exc.debug_id}")
    return ", ".join(parts)


def _issue(exc: ApiException) -> str | None:
    details = getattr(exc, "details", None) or []
    return getattr(details[0], "issue", None) if details else None


def _raise_mapped(exc: Exception) -> NoReturn:
    """Re-raise an SDK/transport error as the gateway hierarchy."""
    if isinstance(exc, ApiException):
        text = _describe(exc)
        if exc.response_code in (408, 409, 429) or exc.response_code >= 500:
            raise TransientPaymentError(text) from exc
        raise PermanentPaymentError(text) from exc
    if isinstance(exc, requests.exceptions.RequestException):
        # Timeout or connection lost: the request may have been executed.
        raise OutcomeUnknown(f"paypal {type(exc).__name__}") from exc
    if isinstance(exc, AuthValidationException):
        raise TransientPaymentError("paypal access token unavailable") from exc
    raise exc


@dataclass(frozen=True)
class CertificateTrust:
    """The roots a PayPal signing certificate must chain to, and the https context of its fetch."""

    store: Store
    tls: ssl.SSLContext
    source: str  # the bundle's path, for messages

    @classmethod
    def load(cls, ca_file: str) -> CertificateTrust:
        """From ``paypal.cert_ca_file``: a PEM bundle, or "" for the system's CAs."""
        path = ca_file or _system_bundle()
        try:
            roots = _certificates(Path(path).read_bytes())
            tls = ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise GatewayConfigError(f"paypal.cert_ca_file: cannot load {path}: {exc}") from None
        if not roots:
            raise GatewayConfigError(f"paypal.cert_ca_file: {path} holds no certificate")
        return cls(Store(roots), tls, path)


def _system_bundle() -> str:
    """The system's CA bundle (OpenSSL's default, or ``SSL_CERT_FILE``); certifi's where there is none."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile:
        return cafile
    import certifi  # an httpx dependency

    return certifi.where()


def _certificates(pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM bundle, skipping any that cannot be parsed.

    Not ``x509.load_pem_x509_certificates``: one odd certificate in a system
    bundle (e.g. a negative serial) would make it refuse the whole bundle.
    """
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for block in _PEM_CERTIFICATE.findall(pem):
            try:
                found.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    return found


def _utcnow() -> datetime:
    return datetime.now(UTC)


class PayPalGateway:
    """:class:`~handlers.payments.base.PaymentGateway` for PayPal (thread-safe).

    ``clock`` gives the time certificates must be valid at (a recorded test
    vector is verified at its own transmission time); ``cert_names`` are the
    accepted certificate subject names.
    """

    provider = PROVIDER

    def __init__(
        self,
        settings: PayPalSettings,
        *,
        clock: Callable[[], datetime] = _utcnow,
        cert_names: tuple[str, ...] = PAYPAL_CERT_NAMES,
        ticker: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._ticker = ticker
        self._cert_names = frozenset(n.lower() for n in cert_names)
        self._cert_origins = cert_origins(settings.cert_host_allowlist)
        self._certs: OrderedDict[str, list[x509.Certificate]] = OrderedDict()
        #: URL or "host:port" → (monotonic time it is forgotten, the failure to raise again)
        self._failures: OrderedDict[str, tuple[float, type[Exception], str]] = OrderedDict()
        self._certs_lock = threading.Lock()
        self._fetch_slots = threading.BoundedSemaphore(CERT_FETCHES_IN_FLIGHT)
        #: loaded at start so that a bad ``cert_ca_file`` stops start-up, not a webhook
        self._trust = CertificateTrust.load(settings.cert_ca_file) if settings.verification == "offline" else None
        self._token: OAuthToken | None = None
        self._client = paypal_client(settings, token_provider=self._fetch_token)

    def _fetch_token(self, _last: OAuthToken | None, auth: OAuth2) -> OAuthToken:
        # Our own provider so that token errors propagate with their status
        # (the SDK's default swallows them into an opaque auth failure).
        self._token = auth.fetch_token()
        return self._token

    def _call(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (ApiException, requests.exceptions.RequestException, AuthValidationException) as exc:
            _raise_mapped(exc)

    # -- payments -----------------------------------------------------------
    def start(self, request: PaymentRequest) -> PaymentResult:
        """Create the order; the buyer approves at ``next_action["approve_url"]``."""
        try:
            value = to_paypal_value(request.amount, request.currency)
        except MoneyError as exc:
            raise PermanentPaymentError(str(exc)) from None
        unit = PurchaseUnitRequest(
            amount=AmountWithBreakdown(currency_code=request.currency.upper(), value=value),
            reference_id=request.order_id,
            custom_id=request.order_id,  # comes back in captures and webhooks
            **({"description": request.description} if request.description else {}),
        )
        extra: dict[str, Any] = {}
        if request.return_url:
            # PayPal's current form: the buyer experience under payment_source.
            extra["payment_source"] = PaymentSource(
                paypal=PaypalWallet(
                    experience_context=PaypalWalletExperienceContext(
                        return_url=request.return_url,
                        cancel_url=request.cancel_url or request.return_url,
                        user_action=PaypalExperienceUserAction.PAY_NOW,
                    )
                )
            )
        body = OrderRequest(intent=CheckoutPaymentIntent.CAPTURE, purchase_units=[unit], **extra)
        response = self._call(
            lambda: self._client.orders.create_order(
                {"body": body, "paypal_request_id": request.idempotency_key, "prefer": "return=representation"}
            )
        )
        return self._order_result(APIHelper.to_dictionary(response.body))

    def capture(self, provider_payment_id: str, idempotency_key: str) -> PaymentResult:
        """Capture an approved order; an already captured one reports its capture."""
        try:
            response = self._client.orders.capture_order(
                {"id": provider_payment_id, "paypal_request_id": idempotency_key, "prefer": "return=representation"}
            )
        except ApiException as exc:
            issue = _issue(exc)
            if issue == "INSTRUMENT_DECLINED":
                return PaymentResult(
                    outcome=PaymentOutcome.DECLINED,
                    provider_payment_id=provider_payment_id,
                    decline_reason=issue,
                    provider_status=issue,
                )
            if issue == "ORDER_ALREADY_CAPTURED":
                # Captured by an earlier attempt whose answer was lost.
                return self._order_result(self._get_order(provider_payment_id))
            _raise_mapped(exc)
        except (requests.exceptions.RequestException, AuthValidationException) as exc:
            _raise_mapped(exc)
        return self._order_result(APIHelper.to_dictionary(response.body))

    def cancel(self, provider_payment_id: str, idempotency_key: str) -> None:
        """Nothing to void for an uncaptured CAPTURE-intent order (see module doc).

        Raises :class:`PaymentAlreadyCaptured` when the order was captured.
        """
        try:
            order = self._get_order(provider_payment_id)
        except PermanentPaymentError as exc:
            if "http 404" in str(exc):
                return  # unknown or purged at PayPal: nothing was taken
            raise
        result = self._order_result(order)
        if result.outcome in (PaymentOutcome.SUCCEEDED, PaymentOutcome.PROCESSING):
            raise PaymentAlreadyCaptured(f"paypal order {provider_payment_id} was captured: refund it")
        log.info(
            "paypal order abandoned", extra={"paypal_order_id": provider_payment_id, "status": result.provider_status}
        )

    def refund(self, result: PaymentResult, amount: int, currency: str, idempotency_key: str) -> RefundResult:
        """Refund ``amount`` (minor units) of the capture ``result.capture_id``.

        Without a capture id (a capture that raced a cancel: PayPal captured
        the order while our record still said otherwise), the order is asked
        for it; an order whose capture has not shown up yet is retried later.
        """
        capture_id = result.capture_id or self._capture_id(result.provider_payment_id)
        try:
            value = to_paypal_value(amount, currency)
        except MoneyError as exc:
            raise PermanentPaymentError(str(exc)) from None
        body = RefundRequest(amount=Money(currency_code=currency.upper(), value=value))
        response = self._call(
            lambda: self._client.payments.refund_captured_payment(
                {
                    "capture_id": capture_id,
                    "body": body,
                    "paypal_request_id": idempotency_key,
                    "prefer": "return=representation",
                }
            )
        )
        refund = APIHelper.to_dictionary(response.body)
        return RefundResult(refund_id=refund["id"], status=str(refund.get("status")))

    def lookup(self, provider_payment_id: str) -> PaymentFacts:
        """The order's facts, from its capture when it has one; an unknown id is ``PaymentFacts.not_found``.

        The capture is read by itself (``GET /v2/payments/captures/{id}``):
        its status, amount, ``custom_id`` and the order it belongs to, which
        must be this order.  A capture refunded in part or in full
        (``PARTIALLY_REFUNDED``, ``REFUNDED``) was still taken; the refunds
        are those the order lists (``purchase_units[].payments.refunds``):
        ``refunded`` sums the ``COMPLETED`` and ``PENDING`` ones,
        ``refund_ids`` names them oldest first.
        """
        found = self._get_or_none(lambda: self._client.orders.get_order({"id": provider_payment_id}))
        if found is None:
            return PaymentFacts.not_found(provider_payment_id)
        order = _api_shape(_Order, found, "order")
        captures = (order.unit.payments.captures if order.unit.payments else None) or []
        capture_id = captures[0].id if captures else None
        if not capture_id:
            amount, currency = _api_minor(order.unit.amount)
            return PaymentFacts(
                provider_payment_id=provider_payment_id,
                taken=False,
                order_id=order.unit.custom_id,
                amount=amount,
                currency=currency,
                status=str(order.status),
            )
        raw = self._get_or_none(lambda: self._client.payments.get_captured_payment({"capture_id": capture_id}))
        if raw is None:
            raise TransientPaymentError(
                f"paypal capture {capture_id} of order {provider_payment_id} is not readable yet"
            )
        capture = _api_shape(_Capture, raw, "capture")
        if capture.order_id != provider_payment_id:
            raise PermanentPaymentError(
                f"paypal capture {capture_id} belongs to order {capture.order_id}, not {provider_payment_id}"
            )
        amount, currency = _api_minor(capture.amount)
        refunds = _giving_back(order)
        return PaymentFacts(
            provider_payment_id=provider_payment_id,
            taken=capture.status in _TAKEN,
            order_id=capture.custom_id,
            amount=amount,
            currency=currency,
            status=str(capture.status),
            capture_id=capture.id or capture_id,
            refunded=sum(_api_minor(r.amount)[0] or 0 for r in refunds),
            refund_ids=tuple(r.id for r in refunds),
        )

    def _get_or_none(self, fn: Callable[[], Any]) -> dict[str, Any] | None:
        """A GET's body as plain data; None for 404."""
        try:
            body: dict[str, Any] = APIHelper.to_dictionary(fn().body)  # the SDK has no types: it is a dict
            return body
        except ApiException as exc:
            if exc.response_code == 404:
                return None
            _raise_mapped(exc)
        except (requests.exceptions.RequestException, AuthValidationException) as exc:
            _raise_mapped(exc)

    def _capture_id(self, order_id: str) -> str:
        found = self._order_result(self._get_order(order_id))
        if found.capture_id:
            return found.capture_id
        if found.outcome is PaymentOutcome.DECLINED:
            raise PermanentPaymentError(f"paypal order {order_id} has no capture to refund ({found.provider_status})")
        raise TransientPaymentError(f"paypal order {order_id} is {found.provider_status}: no capture to refund yet")

    def _get_order(self, order_id: str) -> dict[str, Any]:
        response = self._call(lambda: self._client.orders.get_order({"id": order_id}))
        body: dict[str, Any] = APIHelper.to_dictionary(response.body)  # the SDK has no types: it is a dict
        return body

    @staticmethod
    def _order_result(order: Mapping[str, Any]) -> PaymentResult:
        order_id, status = order["id"], order.get("status")
        if status == "COMPLETED":
            units = order.get("purchase_units") or [{}]
            captures = (units[0].get("payments") or {}).get("captures") or []
            if not captures:
                raise PermanentPaymentError(f"paypal order {order_id} completed without a capture")
            capture = captures[0]
            common = {
                "provider_payment_id": order_id,
                "capture_id": capture["id"],
                "provider_status": capture.get("status"),
            }
            if capture.get("status") in ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED"):
                return PaymentResult(outcome=PaymentOutcome.SUCCEEDED, **common)
            if capture.get("status") == "PENDING":
                return PaymentResult(outcome=PaymentOutcome.PROCESSING, **common)
            reason = (capture.get("status_details") or {}).get("reason") or capture.get("status")
            return PaymentResult(outcome=PaymentOutcome.DECLINED, decline_reason=reason, **common)
        if status in ("CREATED", "SAVED", "PAYER_ACTION_REQUIRED", "APPROVED"):
            links = {link.get("rel"): link.get("href") for link in order.get("links") or []}
            url = links.get("payer-action") or links.get("approve")
            return PaymentResult(
                outcome=PaymentOutcome.REQUIRES_ACTION,
                provider_payment_id=order_id,
                next_action={"approve_url": url} if url and status != "APPROVED" else {},
                provider_status=status,
            )
        if status == "VOIDED":
            return PaymentResult(
                outcome=PaymentOutcome.DECLINED,
                provider_payment_id=order_id,
                decline_reason="VOIDED",
                provider_status=status,
            )
        raise PermanentPaymentError(f"paypal order {order_id} in unexpected status {status}")

    # -- reconciliation ----------------------------------------------------
    def payments_since(self, start: datetime, page_size: int = 100) -> list[ProviderPayment]:
        """Captures and refunds made since ``start``, by Transaction Search (``GET
        /v1/reporting/transactions``: windows of at most :data:`SEARCH_WINDOW`, every page, ``page_size``
        a page); a capture refunded in the window but made before it is read by id
        (``GET /v2/payments/captures/{id}``).  Transaction Search lists a transaction up to three hours late.
        """
        end = datetime.now(UTC)
        found: dict[str, dict[str, Any]] = {}
        window = start
        while window < end:
            until = min(end, window + SEARCH_WINDOW)
            page = 1
            while True:
                body = self._search(window, until, page, max(1, min(page_size, 500)))
                for detail in body.get("transaction_details") or []:
                    info = detail.get("transaction_info") or {}
                    if info.get("transaction_id"):
                        found[str(info["transaction_id"])] = info  # a window's edge may list one twice
                if page >= int(body.get("total_pages") or 0):
                    break
                page += 1
            window = until
        captures, refunds = _split_transactions(found.values())
        for capture_id in [k for k in refunds if k not in captures]:
            captures[capture_id] = _capture_as_transaction(self._read_capture(capture_id))
        return [_listed_payment(info, refunds.get(cid, [])) for cid, info in captures.items()]

    def _read_capture(self, capture_id: str) -> dict[str, Any]:
        response = self._call(lambda: self._client.payments.get_captured_payment({"capture_id": capture_id}))
        return dict(APIHelper.to_dictionary(response.body))

    def _search(self, start: datetime, end: datetime, page: int, page_size: int) -> dict[str, Any]:
        """One page of Transaction Search, as plain data."""
        query = {
            "start_date": _search_time(start),
            "end_date": _search_time(end),
            "fields": "transaction_info",
            "page_size": page_size,
            "page": page,
        }
        response = self._call(lambda: self._client.transaction_search.search_transactions(query))
        return dict(APIHelper.to_dictionary(response.body))

    # -- webhooks -----------------------------------------------------------
    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """Verify the transmission signature and translate the event.

        Raises :class:`WebhookVerificationError` for anything that does not
        verify, and :class:`TransientPaymentError` when the certificate (or
        the postback) cannot be fetched now: answer 5xx so PayPal redelivers.
        """
        h = {k.lower(): v for k, v in headers.items()}
        names = (
            "paypal-transmission-id",
            "paypal-transmission-time",
            "paypal-transmission-sig",
            "paypal-cert-url",
            "paypal-auth-algo",
        )
        missing = [n for n in names if not h.get(n)]
        if missing:
            raise WebhookVerificationError(f"paypal webhook lacks {', '.join(missing)}")
        if self._settings.verification == "postback":
            self._verify_postback(body, h)
        else:
            self._verify_offline(body, h)
        try:
            event = json.loads(body)
        except ValueError:
            raise WebhookVerificationError("paypal webhook body is not JSON") from None
        except RecursionError:  # verified, so PayPal's (or its key holder's) event, unreadable here
            raise MalformedWebhook("paypal webhook body is JSON nested too deeply") from None
        return translate_event(event)

    def _verify_offline(self, body: bytes, h: Mapping[str, str]) -> None:
        if h["paypal-auth-algo"] != "SHA256withRSA":
            raise WebhookVerificationError("paypal webhook: unsupported auth algorithm")
        leaf = self._certificate(h["paypal-cert-url"])
        key = leaf.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise WebhookVerificationError("paypal certificate has no RSA key")
        message = "|".join(
            [
                h["paypal-transmission-id"],
                h["paypal-transmission-time"],
                self._settings.webhook_id,
                str(zlib.crc32(body) & 0xFFFFFFFF),
            ]
        )
        try:
            key.verify(
                base64.b64decode(h["paypal-transmission-sig"], validate=True),
                message.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError):
            raise WebhookVerificationError("paypal webhook signature does not verify") from None

    def _certificate(self, url: str) -> x509.Certificate:
        """The signing certificate at ``url``, verified now (fetched once, then cached; a failure is
        remembered for :data:`CERT_FAILURE_TTL_SECONDS`)."""
        origin = self._check_cert_url(url)
        with self._certs_lock:
            chain = self._certs.get(url)
            if chain is None:
                self._raise_remembered(origin, url)
        if chain is not None:
            self._verify_chain(chain)  # again: it must still be valid now
            return chain[0]
        if not self._fetch_slots.acquire(blocking=False):
            raise CertificateFetchBusy("paypal certificate fetches: every slot in use; redeliver later")
        try:
            try:
                chain = self._fetch_chain(url)
            except _Unreachable as exc:
                self._remember_failure(origin, exc.error)
                raise exc.error from None
            self._verify_chain(chain)  # only a chain that verified is kept
        except (WebhookVerificationError, TransientPaymentError) as exc:
            self._remember_failure(url, exc)
            raise
        finally:
            self._fetch_slots.release()
        with self._certs_lock:
            self._certs[url] = chain
            while len(self._certs) > CERT_CACHE_SIZE:
                self._certs.popitem(last=False)
        return chain[0]

    def _raise_remembered(self, *keys: str) -> None:
        """Raise the failure remembered for any of ``keys`` (a URL, its host and port) that is still fresh."""
        now = self._ticker()
        for key in keys:
            found = self._failures.get(key)
            if found is None:
                continue
            until, kind, message = found
            if until > now:
                raise kind(message)
            del self._failures[key]

    def _remember_failure(self, key: str, exc: Exception) -> None:
        with self._certs_lock:
            self._failures[key] = (self._ticker() + CERT_FAILURE_TTL_SECONDS, type(exc), str(exc))
            self._failures.move_to_end(key)
            while len(self._failures) > CERT_FAILURE_CACHE_SIZE:
                self._failures.popitem(last=False)

    def _check_cert_url(self, url: str) -> str:
        """Refuse, before any connection, a URL that is not https to an allow-listed host and port;
        the URL's ``host:port``."""
        parts = urlsplit(url)
        if parts.scheme != "https":
            raise WebhookVerificationError("paypal certificate URL must be https")
        try:
            port = parts.port or 443
        except ValueError:
            raise WebhookVerificationError("paypal certificate URL has a malformed port") from None
        host = (parts.hostname or "").lower()
        if parts.username is not None or parts.password is not None or (host, port) not in self._cert_origins:
            raise WebhookVerificationError("paypal certificate URL host is not allowed (https on port 443 only)")
        return f"{host}:{port}"

    def _fetch_chain(self, url: str) -> list[x509.Certificate]:
        """The PEM chain at ``url``; raises :class:`_Unreachable` when the host did not answer in time."""
        assert self._trust is not None
        deadline = time.monotonic() + self._settings.timeout_seconds
        try:
            with httpx.stream(
                "GET", url, verify=self._trust.tls, timeout=self._settings.timeout_seconds, follow_redirects=False
            ) as response:
                status = response.status_code
                content = _read_bounded(response, deadline) if status == 200 else b""
        except httpx.HTTPError as exc:
            if _is_untrusted_tls(exc):
                error: Exception = WebhookVerificationError("paypal certificate host's TLS certificate is not trusted")
            else:
                error = TransientPaymentError(f"paypal certificate fetch failed: {type(exc).__name__}")
            raise _Unreachable(error) from None
        if status >= 500 or status == 429:
            raise TransientPaymentError(f"paypal certificate fetch: http {status}")
        if status != 200:  # a redirect too: never followed
            raise WebhookVerificationError(f"paypal certificate fetch: http {status}")
        chain = _certificates(content)
        if not chain:
            raise WebhookVerificationError("paypal certificate URL did not return a PEM certificate")
        return chain

    def _verify_chain(self, chain: list[x509.Certificate]) -> None:
        """The leaf must name PayPal's signing service and chain to a trusted root, valid now."""
        assert self._trust is not None
        leaf = chain[0]
        try:
            names = {
                n.lower()
                for n in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                    x509.DNSName
                )
            }
        except x509.ExtensionNotFound:
            names = set()
        ours = sorted(names & self._cert_names)
        if not ours:
            raise WebhookVerificationError("paypal certificate is not PayPal's message verification certificate")
        verifier = (
            PolicyBuilder().store(self._trust.store).time(self._clock()).build_server_verifier(x509.DNSName(ours[0]))
        )
        try:
            verifier.verify(leaf, chain[1:])
        except VerificationError as exc:
            reason = str(exc).split(" (encountered processing", 1)[0]
            raise WebhookVerificationError(f"paypal certificate does not verify: {reason}") from None

    def _verify_postback(self, body: bytes, h: Mapping[str, str]) -> None:
        """Ask PayPal (``POST /v1/notifications/verify-webhook-signature``)."""
        self._call(lambda: self._client.auth_managers["Oauth2"].is_valid())  # fetches a token if needed
        if self._token is None:
            raise TransientPaymentError("paypal access token unavailable")
        fields = {
            "auth_algo": h["paypal-auth-algo"],
            "cert_url": h["paypal-cert-url"],
            "transmission_id": h["paypal-transmission-id"],
            "transmission_sig": h["paypal-transmission-sig"],
            "transmission_time": h["paypal-transmission-time"],
            "webhook_id": self._settings.webhook_id,
        }
        # The event goes in byte for byte: PayPal checks the CRC of what it signed.
        payload = json.dumps(fields)[:-1].encode() + b', "webhook_event": ' + body + b"}"
        try:
            response = httpx.post(
                self._settings.base_url.rstrip("/") + "/v1/notifications/verify-webhook-signature",
                content=payload,
                timeout=self._settings.timeout_seconds,
                headers={"Authorization": f"Bearer {self._token.access_token}", "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise TransientPaymentError(f"paypal webhook postback failed: {type(exc).__name__}") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientPaymentError(f"paypal webhook postback: http {response.status_code}")
        if response.status_code != 200 or response.json().get("verification_status") != "SUCCESS":
            raise WebhookVerificationError("paypal webhook postback verification failed")


class _Unreachable(Exception):
    """The certificate host did not answer (connection refused or reset, a timeout, TLS it cannot
    prove): remembered for the host and port, not only the URL, so other paths there wait too."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _read_bounded(response: httpx.Response, deadline: float) -> bytes:
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > MAX_CERT_BYTES:
            raise WebhookVerificationError("paypal certificate response is too large")
        if time.monotonic() > deadline:  # a host trickling bytes must not hold the fetch for ever
            raise httpx.ReadTimeout("paypal certificate response too slow")
    return bytes(data)


def _is_untrusted_tls(exc: BaseException) -> bool:
    """Whether an httpx error is the server's TLS certificate failing verification."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Money(Shape):
    currency_code: str
    value: str


class _Related(Shape):
    order_id: Ref | None = None


class _Supplementary(Shape):
    related_ids: _Related | None = None


class _StatusDetails(Shape):
    reason: str | None = None


class _Capture(Shape):
    """A capture, as in ``PAYMENT.CAPTURE.*`` events and ``GET /v2/payments/captures/{id}``."""

    id: Ref | None = None
    status: str | None = None
    amount: _Money | None = None
    custom_id: Ref | None = None
    supplementary_data: _Supplementary | None = None
    status_details: _StatusDetails | None = None

    @property
    def order_id(self) -> str | None:
        """PayPal's order id the capture belongs to."""
        related = self.supplementary_data.related_ids if self.supplementary_data else None
        return related.order_id if related else None


class _Link(Shape):
    href: str
    rel: str | None = None


class _Refund(Shape):
    """A refund, as in ``PAYMENT.CAPTURE.REFUNDED`` events and an order's ``payments.refunds``.

    It names its capture only by its ``up`` link (``/v2/payments/captures/{id}``), and carries our
    order id only when one was given at refund time (``custom_id``).
    """

    id: Ref
    status: str | None = None
    amount: _Money | None = None
    custom_id: Ref | None = None
    create_time: str | None = None
    links: list[_Link] | None = None

    @property
    def capture_id(self) -> str | None:
        """The capture the ``up`` link points at, or None."""
        for link in self.links or []:
            if link.rel == "up":
                found = _CAPTURE_PATH.search(urlsplit(link.href).path)
                if found:
                    return found.group(1)
        return None


class _Payments(Shape):
    captures: list[_Capture] | None = None
    refunds: list[_Refund] | None = None


class _Unit(Shape):
    custom_id: Ref | None = None
    amount: _Money | None = None
    payments: _Payments | None = None


class _Order(Shape):
    id: Ref | None = None
    status: str | None = None
    purchase_units: list[_Unit] | None = None

    @property
    def unit(self) -> _Unit:
        return (self.purchase_units or [_Unit()])[0]


class _Event(Shape):
    id: EventId
    event_type: str
    resource: dict[str, Any] | None = None


def _minor(amount: _Money | None) -> tuple[int | None, str | None]:
    """(minor units, upper-case currency) of a PayPal amount."""
    if amount is None:
        return None, None
    currency = amount.currency_code.upper() or None
    try:
        return (from_decimal_string(amount.value, currency) if currency else None), currency
    except MoneyError:
        raise MalformedWebhook("paypal amount is malformed") from None


def _api_shape(model: type[_S], data: Any, what: str) -> _S:
    """A PayPal API answer read with an event shape; a mismatch is PayPal's fault, not a webhook's."""
    try:
        return read(model, data, f"paypal {what}")
    except MalformedWebhook as exc:
        raise PermanentPaymentError(str(exc)) from None


def _api_minor(amount: _Money | None) -> tuple[int | None, str | None]:
    try:
        return _minor(amount)
    except MalformedWebhook as exc:
        raise PermanentPaymentError(str(exc)) from None


def _giving_back(order: _Order) -> list[_Refund]:
    """The order's refunds that give money back (``COMPLETED``, ``PENDING``), oldest first."""
    refunds = [
        r
        for unit in order.purchase_units or []
        for r in ((unit.payments.refunds if unit.payments else None) or [])
        if r.status in _GIVING_BACK
    ]
    try:
        # PayPal lists them as they were made; sort anyway when every one says when (a stable sort keeps ties)
        return sorted(refunds, key=lambda r: datetime.fromisoformat(str(r.create_time).replace("Z", "+00:00")))
    except (ValueError, TypeError):  # a time that does not parse, or one without a zone beside one with
        return refunds


def _search_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _split_transactions(
    transactions: Iterable[dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Payments (event codes T00xx) by id, and refunds and reversals (T11xx) by the capture they give back."""
    captures: dict[str, dict[str, Any]] = {}
    refunds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for info in transactions:
        code = str(info.get("transaction_event_code") or "")
        if code.startswith("T00"):
            captures[str(info["transaction_id"])] = info
        elif code.startswith("T11") and info.get("paypal_reference_id"):
            refunds[str(info["paypal_reference_id"])].append(info)
    return captures, refunds


def _capture_as_transaction(capture: dict[str, Any]) -> dict[str, Any]:
    """A capture read by id, in Transaction Search's words (refunds before the window: its status says)."""
    status = str(capture.get("status") or "")
    return {
        "transaction_id": capture.get("id"),
        "transaction_event_code": "T0006",
        "transaction_amount": capture.get("amount") or {},
        "transaction_status": {"COMPLETED": "S", "PARTIALLY_REFUNDED": "S", "REFUNDED": "S", "PENDING": "P"}.get(
            status, "D"
        ),
        "custom_field": capture.get("custom_id"),
        "transaction_updated_date": capture.get("update_time") or capture.get("create_time"),
        "_fully_refunded": status == "REFUNDED",
    }


def _search_minor(money: dict[str, Any]) -> tuple[int, str]:
    """(minor units, upper-case currency) of a Transaction Search amount (a refund's is negative)."""
    currency = str(money.get("currency_code") or "").upper()
    try:
        return abs(from_decimal_string(str(money.get("value") or "0"), currency)), currency
    except MoneyError:
        raise PermanentPaymentError(f"paypal amount {money!r} is not an amount") from None


def _listed_payment(info: dict[str, Any], refunds: list[dict[str, Any]]) -> ProviderPayment:
    """A capture as Transaction Search lists it, with its refunds (status ``S`` or ``P`` give money back)."""
    amount, currency = _search_minor(info.get("transaction_amount") or {})
    status = str(info.get("transaction_status") or "")
    giving_back = [r for r in refunds if r.get("transaction_status") in ("S", "P")]
    refunded = sum(_search_minor(r.get("transaction_amount") or {})[0] for r in giving_back)
    if status == "V" or info.get("_fully_refunded"):
        refunded = amount  # reversed, or refunded in full (partly before the window)
    stamps = [_stamp(info.get("transaction_updated_date"))] + [
        _stamp(r.get("transaction_updated_date")) for r in refunds
    ]
    known = [s for s in stamps if s is not None]
    return ProviderPayment(
        payment_id=str(info["transaction_id"]),
        order_id=info.get("custom_field") or None,
        taken=status in ("S", "V"),
        amount=amount,
        currency=currency,
        status=status,
        refunded=refunded,
        refund_ids=tuple(str(r["transaction_id"]) for r in giving_back),
        at=max(known) if known else None,
    )


def _stamp(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def translate_event(event: Any) -> WebhookEvent:
    """A verified PayPal event (parsed JSON) → :class:`WebhookEvent`; MalformedWebhook when it is not one."""
    envelope = read(_Event, event, "paypal event")
    event_type, resource = envelope.event_type, envelope.resource or {}
    common: dict[str, Any] = {"provider": PROVIDER, "event_id": envelope.id, "event_type": event_type}
    if event_type == "PAYMENT.CAPTURE.REFUNDED":
        refund = read(_Refund, resource, "paypal refund")
        capture_id = refund.capture_id
        if not capture_id or len(capture_id) > MAX_MESSAGE_ID:
            raise MalformedWebhook("paypal refund: no up link to the capture it refunds (/v2/payments/captures/{id})")
        amount, currency = _minor(refund.amount)
        # PayPal's refund names neither the order nor (unless given at refund time) our order id
        return WebhookEvent(
            kind=WebhookKind.REFUNDED,
            capture_id=capture_id,
            order_id=refund.custom_id,
            amount=amount,
            currency=currency,
            **common,
        )
    if event_type in ("PAYMENT.CAPTURE.COMPLETED", "PAYMENT.CAPTURE.DENIED", "PAYMENT.CAPTURE.DECLINED"):
        capture = read(_Capture, resource, "paypal capture")
        amount, currency = _minor(capture.amount)
        common.update(
            order_id=capture.custom_id, provider_payment_id=capture.order_id, amount=amount, currency=currency
        )
        if event_type == "PAYMENT.CAPTURE.COMPLETED":
            return WebhookEvent(kind=WebhookKind.CONFIRMED, **common)
        reason = (capture.status_details.reason if capture.status_details else None) or capture.status or "DENIED"
        return WebhookEvent(kind=WebhookKind.FAILED, reason=reason, **common)
    if event_type == "CHECKOUT.ORDER.APPROVED":
        order = read(_Order, resource, "paypal order")
        amount, currency = _minor(order.unit.amount)
        return WebhookEvent(
            kind=WebhookKind.APPROVED,
            order_id=order.unit.custom_id,
            provider_payment_id=order.id,
            amount=amount,
            currency=currency,
            **common,
        )
    return WebhookEvent(kind=WebhookKind.IGNORED, **common)


__all__ = ["PayPalGateway", "translate_event", "PAYPAL_CERT_NAMES"]
