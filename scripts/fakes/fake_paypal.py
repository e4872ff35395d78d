"""A fake PayPal REST API for tests and local runs (standard library only).

Speaks enough of ``api-m.paypal.com`` for ``paypal-server-sdk``:

* ``POST /v1/oauth2/token`` (client credentials, Basic auth) → Bearer token;
* ``POST /v2/checkout/orders`` (intent CAPTURE; amount as a decimal string,
  checked against the currency: HUF, JPY, TWD and other zero-decimal
  currencies refuse decimals) → 201 ``CREATED`` with an ``approve`` link, or
  ``PAYER_ACTION_REQUIRED`` with a ``payer-action`` link when a
  ``payment_source.paypal`` is given, as PayPal does;
* ``GET /v2/checkout/orders/{id}``, ``POST /v2/checkout/orders/{id}/capture``
  (422 ``ORDER_NOT_APPROVED`` until approved, 422 ``ORDER_ALREADY_CAPTURED``);
  a refunded order lists its refunds under ``purchase_units[].payments.refunds``;
* ``GET /v2/payments/captures/{id}``, ``POST /v2/payments/captures/{id}/refund``
  (no ``amount``: the rest; the capture becomes ``PARTIALLY_REFUNDED``, then
  ``REFUNDED``; 422 ``REFUND_AMOUNT_EXCEEDED``, ``CAPTURE_FULLY_REFUNDED``,
  ``DECIMALS_NOT_SUPPORTED``/``DECIMAL_PRECISION``, ``CURRENCY_MISMATCH``);
* ``POST /v1/notifications/verify-webhook-signature`` (checks the signature
  against a certificate loaded into the fake; needs ``cryptography``);
* ``GET /v1/reporting/transactions`` (Transaction Search: ``start_date`` and
  ``end_date`` required, at most 31 days apart; ``page_size`` 1-500, default
  100; ``page`` from 1; ``transaction_id``): captures as ``T0006`` and refunds
  as ``T1107`` (negative amount, ``paypal_reference_id`` the capture), each a
  ``transaction_info`` with ``custom_field`` the capture's ``custom_id``;
  ``page``, ``total_items``, ``total_pages``;
* ``PayPal-Request-Id`` replay: same id and request → the stored answer; same
  id, other request → 422 ``PAYPAL_REQUEST_ID_PREVIOUSLY_USED``.

Control endpoints, besides those of :mod:`common` (reset, faults, charges, log):

* ``POST /_fake/approve/{order_id}`` — the buyer approves; optional body
  ``{"decline": "instrument"}`` (capture answers 422 ``INSTRUMENT_DECLINED``),
  ``{"decline": "capture"}`` (capture status ``DECLINED``) or
  ``{"decline": "pending"}`` (capture status ``PENDING``);
* ``GET /_fake/checkoutnow?token={order_id}`` — the approve link: approves and
  redirects to the order's ``return_url`` (with ``token`` and ``PayerID``, as
  PayPal does);
* ``GET /_fake/refund/{id}`` — the dashboard's "Issue a refund", for a PayPal
  order id or a capture id (either is accepted; an order refunds its capture):
  a tiny HTML form (``amount`` as a decimal string, default the rest not yet
  refunded); ``POST /_fake/refund/{id}`` (form field or JSON ``amount``; empty
  or absent: the rest) refunds through the same code as the API and answers
  ``{"refund": <refund>, "order_id", "capture_id", "capture_status",
  "total_refunded", "remaining"}`` (or the API's error: 400, 422, 404);
* ``PUT|POST /_fake/certs/{name}`` (body: PEM) and ``GET /_fake/certs/{name}``
  — the webhook signing certificates (kept across ``/_fake/reset``, as are
  access tokens); ``/_fake/charges`` also counts ``cert_fetches`` per name.

The service fetches certificates only over https from its allow-listed hosts:
serve the same fake over https too (``serve(0, tls=...)`` sharing ``app``, or
``--tls-port``), with a certificate made by :mod:`paypal_certs`.

Webhooks: when configured (``--webhook-url`` or ``FAKE_PAYPAL_WEBHOOK_URL``,
with a signing certificate and key from :mod:`paypal_certs`:
``--signing-cert/--signing-key`` or ``FAKE_PAYPAL_SIGNING_CERT/_KEY``), the
buyer's approval (either approval endpoint above) sends PayPal's
``CHECKOUT.ORDER.APPROVED`` event, and every refund (through the API, the
service's own included, or the dashboard page; a ``PayPal-Request-Id``
replay sends nothing) ``PAYMENT.CAPTURE.REFUNDED`` whose ``resource`` is the
refund as PayPal sends it (``id``, ``amount``, ``status: "COMPLETED"``,
``seller_payable_breakdown``, ``links`` with ``rel: "up"`` to
``/v2/payments/captures/{capture_id}``; no order id, and ``custom_id`` only
when one was given at refund time), each signed as PayPal signs
(``PAYPAL-TRANSMISSION-SIG`` over ``id|time|webhook_id|crc32(body)``, for
``--webhook-id``, default ``local-fake-webhook`` as in config/config.yaml), its
``PAYPAL-CERT-URL`` on the fake's https listener (or ``--cert-url``), from a
background thread with retries (see :class:`common.WebhookSender`).

Run: ``python scripts/fakes/fake_paypal.py --port 12112 [--tls-port 12113
--tls-cert host.pem --tls-key host.key]``; in-process: ``server = serve(0)``
then ``server.url`` and ``server.stop()``.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
import re
import secrets
import sys
import zlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

try:  # run as a script or imported as scripts.fakes.fake_paypal
    from .common import FakeApp, FakeServer, Request, Response, WebhookSender, form_field, refund_form, run_cli, start
except ImportError:  # pragma: no cover - script mode
    from common import (  # type: ignore[no-redef]
        FakeApp,
        FakeServer,
        Request,
        Response,
        WebhookSender,
        form_field,
        refund_form,
        run_cli,
        start,
    )

if TYPE_CHECKING:
    import ssl

    from .paypal_certs import Issued

DEFAULT_CLIENT_ID = "local-fake-client"
DEFAULT_CLIENT_SECRET = "local-fake-secret"
#: config/config.yaml's paypal.webhook_id, so a local run verifies the fake's webhooks
DEFAULT_WEBHOOK_ID = "local-fake-webhook"
#: the name the webhook signing certificate is served under (``/_fake/certs/{name}``)
SIGNING_CERT_NAME = "fake-webhook-signing.pem"
#: Transaction Search: longest date range, largest page
MAX_SEARCH_DAYS = 31
MAX_PAGE_SIZE = 500
#: capture status → transaction status (S success, P pending, D denied)
_TRANSACTION_STATUS = {"COMPLETED": "S", "PARTIALLY_REFUNDED": "S", "REFUNDED": "S", "PENDING": "P", "DECLINED": "D"}

#: Currencies PayPal takes without decimals (PayPal's list plus ISO zero-decimal ones).
_NO_DECIMALS = {"HUF", "JPY", "TWD", "KRW", "CLP", "ISK", "VND", "XAF", "XOF"}
_VALUE = re.compile(r"^[0-9]{1,16}(\.[0-9]+)?$")
_UNPROCESSABLE = "The requested action could not be performed, semantically incorrect, or failed business validation."


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _search_time(stamp: str) -> str:
    """A ``create_time`` as Transaction Search writes dates (``2024-05-14T09:11:50+0000``)."""
    return _parse_time(stamp).strftime("%Y-%m-%dT%H:%M:%S%z")


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.strip().replace(" ", "+"))  # a "+" unescaped in a query is a space
    if parsed.tzinfo is None:
        raise ValueError("no time zone")
    return parsed


def _pid(n: int = 17) -> str:
    """PayPal-style upper-case alphanumeric id."""
    alphabet = "0123456789ABCDEFGHJKLMNPRSTUVWXY"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _error(
    status: int, name: str, message: str, issue: str | None = None, description: str = "", **detail: Any
) -> Response:
    body: dict[str, Any] = {"name": name, "message": message, "debug_id": _pid(13).lower()}
    if issue:
        body["details"] = [{"issue": issue, "description": description, **detail}]
    return Response(status, body)


def _unprocessable(issue: str, description: str, **detail: Any) -> Response:
    return _error(422, "UNPROCESSABLE_ENTITY", _UNPROCESSABLE, issue, description, **detail)


def _not_found() -> Response:
    return _error(
        404,
        "RESOURCE_NOT_FOUND",
        "The specified resource does not exist.",
        "INVALID_RESOURCE_ID",
        "Specified resource ID does not exist. Please check the resource ID and try again.",
    )


class FakePayPal(FakeApp):
    """The state and endpoints of the fake PayPal account."""

    idempotency_header = "paypal-request-id"

    def __init__(
        self,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        webhook_url: str | None = None,
        webhook_id: str = DEFAULT_WEBHOOK_ID,
        signing_cert: str | None = None,
        signing_key: str | None = None,
        cert_url: str | None = None,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.tokens: set[str] = set()
        self.orders: dict[str, dict[str, Any]] = {}
        self.captures: dict[str, dict[str, Any]] = {}  # capture id → capture (with our order link)
        self.refunds: dict[str, dict[str, Any]] = {}
        self.certs: dict[str, str] = {}
        self.cert_fetches: dict[str, int] = {}  # name → GETs, to see caching work
        self.webhook_id = webhook_id
        self.signer: Issued | None = None
        self.cert_url: str | None = None
        if webhook_url:
            if not (signing_cert and signing_key):
                raise ValueError(
                    "webhooks need a signing certificate and key (--signing-cert/--signing-key or "
                    "FAKE_PAYPAL_SIGNING_CERT/FAKE_PAYPAL_SIGNING_KEY; `python scripts/fakes/paypal_certs.py DIR` makes them)"
                )
            try:
                from .paypal_certs import Issued as _Issued
            except ImportError:  # pragma: no cover - script mode
                from paypal_certs import Issued as _Issued  # type: ignore[no-redef]
            self.configure_webhooks(webhook_url, _Issued.load(signing_cert, signing_key), webhook_id, cert_url)

    def configure_webhooks(
        self,
        url: str | None,
        signer: Issued | None = None,
        webhook_id: str = DEFAULT_WEBHOOK_ID,
        cert_url: str | None = None,
    ) -> None:
        """Deliver events to ``url``, signed by ``signer`` for ``webhook_id`` (``url`` None: deliver none).

        The signing certificate is served at ``/_fake/certs/{SIGNING_CERT_NAME}``; ``cert_url`` is the
        ``PAYPAL-CERT-URL`` sent (default: that path on the fake's https listener, ``tls_url``).
        """
        if url and signer is None:
            raise ValueError("PayPal webhooks need a signer")
        self.webhooks = WebhookSender(url) if url else None
        self.signer, self.webhook_id, self.cert_url = signer, webhook_id, cert_url
        if signer is not None:
            self.certs[SIGNING_CERT_NAME] = signer.cert_pem.decode()

    def reset_provider(self) -> None:
        # Tokens and certificates survive: running clients keep working.
        self.orders.clear()
        self.captures.clear()
        self.refunds.clear()

    # -- plumbing -----------------------------------------------------------
    def authenticate(self, req: Request) -> Response | None:
        auth = req.headers.get("authorization", "")
        if req.path == "/v1/oauth2/token":
            expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
            if auth != f"Basic {expected}":
                return Response(401, {"error": "invalid_client", "error_description": "Client Authentication failed"})
            return None
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return Response(401, {"error": "invalid_token", "error_description": "Token signature verification failed"})
        return None

    def idempotency_scope(self, req: Request) -> str:
        return self.client_id  # request ids belong to the merchant, not to one token

    def fingerprint(self, req: Request) -> Any:
        try:
            body = json.loads(req.body) if req.body else None
        except ValueError:
            body = req.body
        return (req.method, req.path, body)

    def idempotency_conflict(self, req: Request) -> Response:
        resp = _unprocessable(
            "PAYPAL_REQUEST_ID_PREVIOUSLY_USED", "The PayPal-Request-Id has already been used for another request."
        )
        resp.store = False
        return resp

    def fault_response(self, status: int) -> Response:
        if status == 429:
            return _error(429, "RATE_LIMIT_REACHED", "Too many requests. Blocked due to rate limiting.")
        if status == 503:
            return _error(503, "SERVICE_UNAVAILABLE", "Service Unavailable. (injected)")
        return _error(status, "INTERNAL_SERVER_ERROR", "An internal server error occurred. (injected)")

    # -- endpoints ----------------------------------------------------------
    def handle_api(self, req: Request) -> Response:
        parts = req.path.strip("/").split("/")
        try:
            body = req.json() if req.body and req.path != "/v1/oauth2/token" else {}
        except ValueError:
            return _error(
                400,
                "INVALID_REQUEST",
                "Request is not well-formed, syntactically incorrect, or violates schema.",
                "MALFORMED_REQUEST_JSON",
                "The request JSON is not well formed.",
            )
        base = f"http://{req.host}"
        if req.path == "/v1/oauth2/token" and req.method == "POST":
            token = "A21AA" + secrets.token_urlsafe(24)
            self.tokens.add(token)
            return Response(
                200,
                {
                    "scope": "https://uri.paypal.com/services/payments/payment",
                    "access_token": token,
                    "token_type": "Bearer",
                    "app_id": "APP-FAKE",
                    "expires_in": 32400,
                    "nonce": _now(),
                },
            )
        if parts[:3] == ["v2", "checkout", "orders"]:
            if len(parts) == 3 and req.method == "POST":
                return self._create_order(body, base)
            order = self.orders.get(parts[3]) if len(parts) > 3 else None
            if order is None:
                return _not_found()
            if len(parts) == 4 and req.method == "GET":
                return Response(200, self._public(order))
            if len(parts) == 5 and parts[4] == "capture" and req.method == "POST":
                return self._capture(order, base)
        if parts[:3] == ["v2", "payments", "captures"] and len(parts) >= 4:
            capture = self.captures.get(parts[3])
            if capture is None:
                return _not_found()
            if len(parts) == 4 and req.method == "GET":
                return Response(200, capture)
            if len(parts) == 5 and parts[4] == "refund" and req.method == "POST":
                return self._refund(capture, body, base)
        if req.path == "/v1/notifications/verify-webhook-signature" and req.method == "POST":
            return self._verify_webhook(req, body)
        if req.path == "/v1/reporting/transactions" and req.method == "GET":
            return self._search(req, base)
        return _error(404, "NOT_FOUND", f"No route for {req.method} {req.path}")

    def _create_order(self, body: dict[str, Any], base: str) -> Response:
        units = body.get("purchase_units") or []
        if body.get("intent") != "CAPTURE" or not units:
            return _error(
                400,
                "INVALID_REQUEST",
                "Request is not well-formed, syntactically incorrect, or violates schema.",
                "MISSING_REQUIRED_PARAMETER",
                "intent CAPTURE and purchase_units are required (fake supports CAPTURE only).",
            )
        amount = units[0].get("amount") or {}
        currency, value = str(amount.get("currency_code", "")), str(amount.get("value", ""))
        problem = _amount_problem(currency, value, "/purchase_units/@reference_id=='default'/amount/value")
        if problem is not None:
            return problem
        order_id = _pid()
        experience = ((body.get("payment_source") or {}).get("paypal") or {}).get("experience_context") or {}
        experience = experience or body.get("application_context") or {}
        with_source = "paypal" in (body.get("payment_source") or {})
        approve = {
            "href": f"{base}/_fake/checkoutnow?token={order_id}",
            "rel": "payer-action" if with_source else "approve",
            "method": "GET",
        }
        order = {
            "id": order_id,
            "intent": "CAPTURE",
            "status": "PAYER_ACTION_REQUIRED" if with_source else "CREATED",
            "create_time": _now(),
            "purchase_units": [
                {
                    "reference_id": units[0].get("reference_id", "default"),
                    "custom_id": units[0].get("custom_id"),
                    "invoice_id": units[0].get("invoice_id"),
                    "description": units[0].get("description"),
                    "amount": {"currency_code": currency, "value": value},
                    "payee": {"merchant_id": "FAKEMERCHANT01"},
                }
            ],
            "links": [
                {"href": f"{base}/v2/checkout/orders/{order_id}", "rel": "self", "method": "GET"},
                approve,
                {"href": f"{base}/v2/checkout/orders/{order_id}/capture", "rel": "capture", "method": "POST"},
            ],
            "_return_url": experience.get("return_url"),
            "_decline": None,
        }
        if with_source:
            order["payment_source"] = {"paypal": {}}
        self.orders[order_id] = order
        return Response(201, self._public(order))

    @staticmethod
    def _public(order: dict[str, Any]) -> dict[str, Any]:
        """The order as the API shows it (without the fake's bookkeeping)."""
        unit = {k: v for k, v in order["purchase_units"][0].items() if v is not None}
        return {**{k: v for k, v in order.items() if not k.startswith("_")}, "purchase_units": [unit]}

    def _approve(self, order: dict[str, Any], decline: str | None, base: str) -> Response:
        if order["status"] not in ("CREATED", "PAYER_ACTION_REQUIRED", "APPROVED"):
            return Response(409, {"error": f"order is {order['status']}"})
        newly = order["status"] != "APPROVED"
        order["status"] = "APPROVED"
        order["_decline"] = decline
        order["payer"] = {
            "payer_id": "FAKEPAYER0001",
            "email_address": "buyer@example.com",
            "name": {"given_name": "Fake", "surname": "Buyer"},
        }
        order["update_time"] = _now()
        if newly:
            self._send_approved(order, base)
        return Response(200, self._public(order))

    def _send_approved(self, order: dict[str, Any], base: str) -> None:
        """PayPal's ``CHECKOUT.ORDER.APPROVED`` event, signed, to the configured endpoint."""
        resource = copy.deepcopy(self._public(order))
        # an approved order's links: itself, update and capture (the approval link is used up)
        resource["links"] = [
            {"href": f"{base}/v2/checkout/orders/{order['id']}", "rel": "self", "method": "GET"},
            {"href": f"{base}/v2/checkout/orders/{order['id']}", "rel": "update", "method": "PATCH"},
            {"href": f"{base}/v2/checkout/orders/{order['id']}/capture", "rel": "capture", "method": "POST"},
        ]
        self._send_event(
            "CHECKOUT.ORDER.APPROVED", "checkout-order", "An order has been approved by buyer", resource, base
        )

    def _send_event(
        self, event_type: str, resource_type: str, summary: str, resource: dict[str, Any], base: str
    ) -> None:
        """A PayPal event about ``resource``, signed as PayPal signs, to the configured endpoint (if any)."""
        if self.webhooks is None or self.signer is None:
            return
        cert_url = self.cert_url or (f"{self.tls_url}/_fake/certs/{SIGNING_CERT_NAME}" if self.tls_url else None)
        if cert_url is None:
            print(
                "[fake] PayPal webhook not sent: no certificate URL (serve the fake over https too, or give cert_url)",
                file=sys.stderr,
                flush=True,
            )
            return
        event_id = f"WH-{_pid()}-{_pid()}"
        event = {
            "id": event_id,
            "event_version": "1.0",
            "create_time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "resource_type": resource_type,
            "resource_version": "2.0",
            "event_type": event_type,
            "summary": summary,
            "resource": copy.deepcopy(resource),
            "links": [
                {"href": f"{base}/v1/notifications/webhooks-events/{event_id}", "rel": "self", "method": "GET"},
                {
                    "href": f"{base}/v1/notifications/webhooks-events/{event_id}/resend",
                    "rel": "resend",
                    "method": "POST",
                },
            ],
        }
        try:
            from .paypal_certs import paypal_headers
        except ImportError:  # pragma: no cover - script mode
            from paypal_certs import paypal_headers  # type: ignore[no-redef]
        body = json.dumps(event).encode()
        signer, webhook_id = self.signer, self.webhook_id
        self.webhooks.send(event_id, event_type, body, lambda: paypal_headers(signer, body, webhook_id, cert_url))

    def _capture(self, order: dict[str, Any], base: str) -> Response:
        if order["status"] == "COMPLETED":
            return _unprocessable(
                "ORDER_ALREADY_CAPTURED",
                "Order already captured. If 'intent=CAPTURE' only one capture per order is allowed.",
            )
        if order["status"] != "APPROVED":
            return _unprocessable("ORDER_NOT_APPROVED", "Payer has not yet approved the Order for payment.")
        if order["_decline"] == "instrument":
            # The buyer has to pick another funding source: back to approval.
            order.update(status="PAYER_ACTION_REQUIRED" if "payment_source" in order else "CREATED", _decline=None)
            return _unprocessable(
                "INSTRUMENT_DECLINED",
                "The instrument presented was either declined by the processor or bank, or it can't be used for this payment.",
            )
        unit = order["purchase_units"][0]
        capture_id = _pid()
        status = {"capture": "DECLINED", "pending": "PENDING"}.get(order["_decline"] or "", "COMPLETED")
        capture: dict[str, Any] = {
            "id": capture_id,
            "status": status,
            "amount": dict(unit["amount"]),
            "final_capture": True,
            "custom_id": unit.get("custom_id"),
            "seller_protection": {
                "status": "ELIGIBLE",
                "dispute_categories": ["ITEM_NOT_RECEIVED", "UNAUTHORIZED_TRANSACTION"],
            },
            "create_time": _now(),
            "update_time": _now(),
            "supplementary_data": {"related_ids": {"order_id": order["id"]}},
            "links": [
                {"href": f"{base}/v2/payments/captures/{capture_id}", "rel": "self", "method": "GET"},
                {"href": f"{base}/v2/payments/captures/{capture_id}/refund", "rel": "refund", "method": "POST"},
                {"href": f"{base}/v2/checkout/orders/{order['id']}", "rel": "up", "method": "GET"},
            ],
        }
        if status == "PENDING":
            capture["status_details"] = {"reason": "PENDING_REVIEW"}
        if status == "DECLINED":
            capture["status_details"] = {"reason": "DECLINED_BY_PROCESSOR"}
        self.captures[capture_id] = capture
        unit["payments"] = {"captures": [capture]}
        order["status"] = "COMPLETED"
        return Response(201, self._public(order))

    def _refunded(self, capture_id: str) -> Decimal:
        return sum(
            (Decimal(r["amount"]["value"]) for r in self.refunds.values() if r["_capture"] == capture_id), Decimal(0)
        )

    def _refund(self, capture: dict[str, Any], body: dict[str, Any], base: str) -> Response:
        if capture["status"] not in ("COMPLETED", "PARTIALLY_REFUNDED"):
            return _unprocessable(
                "CAPTURE_FULLY_REFUNDED" if capture["status"] == "REFUNDED" else "REFUND_NOT_ALLOWED",
                "The capture cannot be refunded in its state.",
            )
        remaining = Decimal(capture["amount"]["value"]) - self._refunded(capture["id"])
        currency = capture["amount"]["currency_code"]
        asked = body.get("amount") or {}
        if asked:
            problem = _amount_problem(currency, str(asked.get("value", "")), "/amount/value")
            if problem is not None:
                return problem
            if asked.get("currency_code") != currency:
                return _unprocessable(
                    "CURRENCY_MISMATCH",
                    "Refund must be in the same currency as the capture.",
                    field="/amount/currency_code",
                )
        value = Decimal(str(asked["value"])) if asked else remaining
        if value > remaining or value <= 0:
            return _unprocessable(
                "REFUND_AMOUNT_EXCEEDED",
                "The refund amount must be less than or equal to the capture amount that has not yet been refunded.",
            )
        refund_id = _pid()
        total = self._refunded(capture["id"]) + value
        refund = {
            "id": refund_id,
            "status": "COMPLETED",
            "_capture": capture["id"],
            "amount": {"currency_code": currency, "value": _money(value, currency)},
            "invoice_id": body.get("invoice_id"),
            "custom_id": body.get("custom_id"),
            "note_to_payer": body.get("note_to_payer"),
            "seller_payable_breakdown": {  # the fake charges no fees
                "gross_amount": {"currency_code": currency, "value": _money(value, currency)},
                "paypal_fee": {"currency_code": currency, "value": _zero(currency)},
                "net_amount": {"currency_code": currency, "value": _money(value, currency)},
                "total_refunded_amount": {"currency_code": currency, "value": _money(total, currency)},
            },
            "create_time": _now(),
            "update_time": _now(),
            "links": [
                {"href": f"{base}/v2/payments/refunds/{refund_id}", "rel": "self", "method": "GET"},
                {"href": f"{base}/v2/payments/captures/{capture['id']}", "rel": "up", "method": "GET"},
            ],
        }
        self.refunds[refund_id] = refund
        capture["status"] = "REFUNDED" if value == remaining else "PARTIALLY_REFUNDED"
        capture["update_time"] = _now()
        public = _present({k: v for k, v in refund.items() if not k.startswith("_")})
        # the order lists its refunds beside its captures (GET /v2/checkout/orders/{id})
        order = self.orders[capture["supplementary_data"]["related_ids"]["order_id"]]
        order["purchase_units"][0].setdefault("payments", {}).setdefault("refunds", []).append(copy.deepcopy(public))
        # PayPal tells the account's webhook about every refund, whoever made it (API or dashboard)
        summary = f"A {_money(value, currency)} {currency} capture payment was refunded"
        self._send_event("PAYMENT.CAPTURE.REFUNDED", "refund", summary, public, base)
        return Response(201, public)

    def _dashboard_refund(self, req: Request, payment_id: str) -> Response:
        """The dashboard's "Issue a refund", for a PayPal order id or a capture id: GET a form, POST refunds.

        The refund goes through the API's code, so ``PAYMENT.CAPTURE.REFUNDED`` is sent as for an API refund.
        """
        order = self.orders.get(payment_id)
        if order is not None:
            captures = (order["purchase_units"][0].get("payments") or {}).get("captures") or []
            capture = self.captures.get(captures[0]["id"]) if captures else None
            if capture is None:
                return _unprocessable("REFUND_NOT_ALLOWED", f"Order {payment_id} has no capture to refund.")
        else:
            capture = self.captures.get(payment_id)
            if capture is None:
                return _not_found()
        base = f"http://{req.host}"
        taken = Decimal(capture["amount"]["value"])
        remaining = taken - self._refunded(capture["id"])
        currency = capture["amount"]["currency_code"]
        if req.method == "GET":
            return refund_form(
                f"Refund capture {capture['id']}",
                f"{capture['amount']['value']} {currency} captured, {_money(remaining, currency)} refundable "
                f"(status {capture['status']}).",
                f"amount ({currency})",
                _money(remaining, currency) if remaining > 0 else "",
            )
        amount = form_field(req, "amount")
        resp = self._refund(capture, {"amount": {"currency_code": currency, "value": amount}} if amount else {}, base)
        if resp.status != 201:
            return resp
        refunded = self._refunded(capture["id"])
        return Response(
            200,
            {
                "refund": resp.body,
                "order_id": capture["supplementary_data"]["related_ids"]["order_id"],
                "capture_id": capture["id"],
                "capture_status": capture["status"],
                "total_refunded": {"currency_code": currency, "value": _money(refunded, currency)},
                "remaining": {"currency_code": currency, "value": _money(taken - refunded, currency)},
            },
        )

    def _search(self, req: Request, base: str) -> Response:
        """Transaction Search: the account's captures and refunds between two dates, a page at a time."""
        query = {k: v[-1] for k, v in req.query.items()}

        def invalid(field: str, issue: str) -> Response:
            return _error(
                400,
                "INVALID_REQUEST",
                "Request is not well-formed, syntactically incorrect, or violates schema.",
                issue,
                issue,
                field=field,
                value=query.get(field, ""),
                location="query",
            )

        try:
            start_date, end_date = _parse_time(query["start_date"]), _parse_time(query["end_date"])
        except KeyError as exc:
            return invalid(str(exc.args[0]), "MISSING_REQUIRED_PARAMETER")
        except ValueError:
            return invalid("start_date" if "start_date" in query else "end_date", "INVALID_PARAMETER_SYNTAX")
        if end_date < start_date:
            return invalid("end_date", "End date should be greater than start date.")
        if end_date - start_date > timedelta(days=MAX_SEARCH_DAYS):
            return invalid("start_date", "Date range is greater than 31 days")
        try:
            page_size, page = int(query.get("page_size", "100")), int(query.get("page", "1"))
        except ValueError:
            return invalid("page_size", "INVALID_PARAMETER_SYNTAX")
        if not 1 <= page_size <= MAX_PAGE_SIZE or page < 1:
            return invalid("page_size" if not 1 <= page_size <= MAX_PAGE_SIZE else "page", "INVALID_PARAMETER_VALUE")
        wanted = query.get("transaction_id")
        found = [
            t
            for t in self._transactions()
            if start_date <= _parse_time(t["transaction_info"]["transaction_initiation_date"]) <= end_date
            and wanted in (None, t["transaction_info"]["transaction_id"])
        ]
        total_pages = math.ceil(len(found) / page_size)
        links = [{"href": f"{base}/v1/reporting/transactions?{urlencode(query)}", "rel": "self", "method": "GET"}]
        if page < total_pages:
            following = urlencode({**query, "page": page + 1})
            links.append({"href": f"{base}/v1/reporting/transactions?{following}", "rel": "next", "method": "GET"})
        return Response(
            200,
            {
                "transaction_details": found[(page - 1) * page_size : page * page_size],
                "account_number": "FAKEMERCHANT01",
                "start_date": _search_time(query["start_date"]),
                "end_date": _search_time(query["end_date"]),
                "last_refreshed_datetime": _search_time(_now()),
                "page": page,
                "total_items": len(found),
                "total_pages": total_pages,
                "links": links,
            },
        )

    def _transactions(self) -> list[dict[str, Any]]:
        """Captures (``T0006``) and refunds (``T1107``, negative) as Transaction Search lists them, oldest first."""
        found: list[tuple[str, int, dict[str, Any]]] = []
        for n, capture in enumerate(self.captures.values()):
            unit = self.orders[capture["supplementary_data"]["related_ids"]["order_id"]]["purchase_units"][0]
            info = {
                "paypal_account_id": "FAKEPAYER0001",
                "transaction_id": capture["id"],
                "transaction_event_code": "T0006",
                "transaction_initiation_date": _search_time(capture["create_time"]),
                "transaction_updated_date": _search_time(capture["update_time"]),
                "transaction_amount": dict(capture["amount"]),
                "transaction_status": _TRANSACTION_STATUS.get(capture["status"], "S"),
                "invoice_id": unit.get("invoice_id"),
                "custom_field": capture.get("custom_id"),
                "protection_eligibility": "01",
            }
            found.append((capture["create_time"], n, {"transaction_info": _present(info)}))
        for n, refund in enumerate(self.refunds.values(), start=len(found)):
            capture = self.captures[refund["_capture"]]
            info = {
                "paypal_account_id": "FAKEPAYER0001",
                "transaction_id": refund["id"],
                "paypal_reference_id": capture["id"],
                "paypal_reference_id_type": "TXN",
                "transaction_event_code": "T1107",
                "transaction_initiation_date": _search_time(refund["create_time"]),
                "transaction_updated_date": _search_time(refund["create_time"]),
                "transaction_amount": {
                    "currency_code": refund["amount"]["currency_code"],
                    "value": "-" + refund["amount"]["value"],
                },
                "transaction_status": "S",
                "custom_field": refund.get("custom_id"),
            }
            found.append((refund["create_time"], n, {"transaction_info": _present(info)}))
        return [detail for _, _, detail in sorted(found, key=lambda f: (_parse_time(f[0]), f[1]))]

    def _verify_webhook(self, req: Request, body: dict[str, Any]) -> Response:
        """Postback verification: the same check PayPal does, with the fake's certs."""
        raw_event = _raw_member(req.body, "webhook_event")
        name = str(body.get("cert_url", "")).rstrip("/").rsplit("/", 1)[-1]
        pem = self.certs.get(name)
        ok = False
        if pem is not None and raw_event is not None and body.get("auth_algo") == "SHA256withRSA":
            from cryptography import x509
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding

            message = f"{body.get('transmission_id')}|{body.get('transmission_time')}|{body.get('webhook_id')}|{zlib.crc32(raw_event)}"
            try:
                key = x509.load_pem_x509_certificate(pem.encode()).public_key()
                key.verify(
                    base64.b64decode(str(body.get("transmission_sig"))),
                    message.encode(),
                    padding.PKCS1v15(),
                    hashes.SHA256(),
                )  # type: ignore[union-attr, call-arg]
                ok = True
            except (InvalidSignature, ValueError):
                ok = False
        return Response(200, {"verification_status": "SUCCESS" if ok else "FAILURE"})

    # -- control ------------------------------------------------------------
    def handle_control(self, req: Request, path: str) -> Response | None:
        base = f"http://{req.host}"
        if path.startswith("approve/") and req.method == "POST":
            order = self.orders.get(path[len("approve/") :])
            if order is None:
                return _not_found()
            return self._approve(order, (req.json() or {}).get("decline") if req.body else None, base)
        if path == "checkoutnow" and req.method == "GET":
            order = self.orders.get((req.query.get("token") or [""])[0])
            if order is None:
                return _not_found()
            resp = self._approve(order, None, base)
            if resp.status == 200 and order["_return_url"]:
                sep = "&" if "?" in order["_return_url"] else "?"
                query = urlencode({"token": order["id"], "PayerID": order["payer"]["payer_id"]})
                return Response(302, "", {"Location": f"{order['_return_url']}{sep}{query}"})
            return resp
        if path.startswith("refund/") and req.method in ("GET", "POST"):
            return self._dashboard_refund(req, path[len("refund/") :])
        if path.startswith("certs/"):
            name = path[len("certs/") :]
            if req.method in ("PUT", "POST"):
                self.certs[name] = req.body.decode()
                return Response(200, {"stored": name})
            if req.method == "GET":
                self.cert_fetches[name] = self.cert_fetches.get(name, 0) + 1
                pem = self.certs.get(name)
                return (
                    Response(200, pem, {"Content-Type": "application/x-pem-file"})
                    if pem
                    else Response(404, "no such certificate")
                )
        return None

    def charges(self) -> dict[str, Any]:
        orders: dict[str, dict[str, Any]] = {}
        for order in self.orders.values():
            unit = order["purchase_units"][0]
            entry = orders.setdefault(
                unit.get("custom_id") or "",
                {"orders": 0, "captures": 0, "amount_captured": "0", "refunds": 0, "amount_refunded": "0"},
            )
            entry["orders"] += 1
            for capture in (unit.get("payments") or {}).get("captures", []):
                if capture["status"] in ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED"):
                    entry["captures"] += 1
                    entry["amount_captured"] = str(
                        Decimal(entry["amount_captured"]) + Decimal(capture["amount"]["value"])
                    )
                for refund in self.refunds.values():
                    if refund["_capture"] == capture["id"]:
                        entry["refunds"] += 1
                        entry["amount_refunded"] = str(
                            Decimal(entry["amount_refunded"]) + Decimal(refund["amount"]["value"])
                        )
        return {"orders": orders, "cert_fetches": dict(self.cert_fetches)}


def _zero(currency: str) -> str:
    return _money(Decimal(0), currency)


def _money(value: Decimal, currency: str) -> str:
    """``value`` written as PayPal writes amounts of ``currency`` (no decimals, or two)."""
    return str(value.quantize(Decimal(1) if currency in _NO_DECIMALS else Decimal("0.01")))


def _amount_problem(currency: str, value: str, field: str) -> Response | None:
    """PayPal's answer to an amount ``value`` it does not take in ``currency``; None when it is fine."""
    if not _VALUE.match(value):
        return _error(
            400,
            "INVALID_REQUEST",
            "Request is not well-formed, syntactically incorrect, or violates schema.",
            "INVALID_PARAMETER_SYNTAX",
            "The value of a field does not conform to the expected format.",
            field=field,
            value=value,
        )
    decimals = -Decimal(value).as_tuple().exponent  # type: ignore[operator]
    if currency in _NO_DECIMALS and decimals > 0:
        return _unprocessable(
            "DECIMALS_NOT_SUPPORTED", "Currency code does not support decimals.", field=field, value=value
        )
    if decimals > 2:
        return _unprocessable(
            "DECIMAL_PRECISION",
            "If the currency supports decimals, only two decimal place precision is supported.",
            field=field,
            value=value,
        )
    return None


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _raw_member(document: bytes, member: str) -> bytes | None:
    """The exact bytes of a top-level JSON member's value.

    The signature covers the webhook body byte for byte, so the postback must
    check the event as it was sent, not a re-serialisation of it.
    """
    text = document.decode("utf-8", errors="replace")
    match = re.search(r'"%s"\s*:\s*' % re.escape(member), text)
    if match is None:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(text, match.end())
    except ValueError:
        return None
    return text[match.end() : end].encode()


def serve(
    port: int = 0,
    host: str = "127.0.0.1",
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str = DEFAULT_CLIENT_SECRET,
    verbose: bool = False,
    tls: ssl.SSLContext | None = None,
    app: FakePayPal | None = None,
) -> FakeServer:
    """Start the fake in a daemon thread and return the running server.

    ``port=0`` picks a free port (read ``server.url``); ``server.app`` is the
    :class:`FakePayPal`; ``server.stop()`` shuts it down.  ``tls`` serves
    https; ``app`` serves an existing fake (e.g. the http one's ``app``, so
    that its certificates are reachable over https).
    """
    app = app or FakePayPal(client_id=client_id, client_secret=client_secret)
    return start(app, port, host, verbose, tls)


def main() -> None:
    """Command line: serve in the foreground."""

    def options(parser: Any) -> None:
        env = os.environ.get
        parser.add_argument("--client-id", dest="client_id", default=DEFAULT_CLIENT_ID)
        parser.add_argument("--client-secret", dest="client_secret", default=DEFAULT_CLIENT_SECRET)
        parser.add_argument(
            "--webhook-url",
            dest="webhook_url",
            default=env("FAKE_PAYPAL_WEBHOOK_URL") or None,
            help="deliver events here (default: $FAKE_PAYPAL_WEBHOOK_URL; none: no webhooks)",
        )
        parser.add_argument(
            "--webhook-id",
            dest="webhook_id",
            default=env("FAKE_PAYPAL_WEBHOOK_ID") or DEFAULT_WEBHOOK_ID,
            help="the webhook id the events are signed for (the service's paypal.webhook_id)",
        )
        parser.add_argument(
            "--signing-cert", dest="signing_cert", default=env("FAKE_PAYPAL_SIGNING_CERT") or None, help="PEM"
        )
        parser.add_argument(
            "--signing-key", dest="signing_key", default=env("FAKE_PAYPAL_SIGNING_KEY") or None, help="PEM"
        )
        parser.add_argument(
            "--cert-url",
            dest="cert_url",
            default=env("FAKE_PAYPAL_CERT_URL") or None,
            help="PAYPAL-CERT-URL of the events (default: the signing certificate on the --tls-port listener)",
        )

    run_cli(FakePayPal, 12112, "fake PayPal API", options)


if __name__ == "__main__":
    main()
