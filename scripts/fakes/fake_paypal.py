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
* ``GET /v2/payments/captures/{id}``, ``POST /v2/payments/captures/{id}/refund``;
* ``POST /v1/notifications/verify-webhook-signature`` (checks the signature
  against a certificate loaded into the fake; needs ``cryptography``);
* ``PayPal-Request-Id`` replay: same id and request → the stored answer; same
  id, other request → 422 ``PAYPAL_REQUEST_ID_PREVIOUSLY_USED``.

Control endpoints, besides those of :mod:`common` (reset, faults, charges, log):

* ``POST /_fake/approve/{order_id}`` — the buyer approves; optional body
  ``{"decline": "instrument"}`` (capture answers 422 ``INSTRUMENT_DECLINED``),
  ``{"decline": "capture"}`` (capture status ``DECLINED``) or
  ``{"decline": "pending"}`` (capture status ``PENDING``);
* ``GET /_fake/checkoutnow?token={order_id}`` — the approve link: approves and
  redirects to the order's ``return_url``;
* ``PUT|POST /_fake/certs/{name}`` (body: PEM) and ``GET /_fake/certs/{name}``
  — the webhook signing certificates (kept across ``/_fake/reset``, as are
  access tokens); ``/_fake/charges`` also counts ``cert_fetches`` per name.

The service fetches certificates only over https from its allow-listed hosts:
serve the same fake over https too (``serve(0, tls=...)`` sharing ``app``, or
``--tls-port``), with a certificate made by :mod:`paypal_certs`.

Run: ``python scripts/fakes/fake_paypal.py --port 12112 [--tls-port 12113
--tls-cert host.pem --tls-key host.key]``; in-process: ``server = serve(0)``
then ``server.url`` and ``server.stop()``.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import zlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

try:  # run as a script or imported as scripts.fakes.fake_paypal
    from .common import FakeApp, FakeServer, Request, Response, run_cli, start
except ImportError:  # pragma: no cover - script mode
    from common import FakeApp, FakeServer, Request, Response, run_cli, start  # type: ignore[no-redef]

if TYPE_CHECKING:
    import ssl

DEFAULT_CLIENT_ID = "local-fake-client"
DEFAULT_CLIENT_SECRET = "local-fake-secret"

#: Currencies PayPal takes without decimals (PayPal's list plus ISO zero-decimal ones).
_NO_DECIMALS = {"HUF", "JPY", "TWD", "KRW", "CLP", "ISK", "VND", "XAF", "XOF"}
_VALUE = re.compile(r"^[0-9]{1,16}(\.[0-9]+)?$")
_UNPROCESSABLE = "The requested action could not be performed, semantically incorrect, or failed business validation."


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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

    def __init__(self, client_id: str = DEFAULT_CLIENT_ID, client_secret: str = DEFAULT_CLIENT_SECRET) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.tokens: set[str] = set()
        self.orders: dict[str, dict[str, Any]] = {}
        self.captures: dict[str, dict[str, Any]] = {}  # capture id → capture (with our order link)
        self.refunds: dict[str, dict[str, Any]] = {}
        self.certs: dict[str, str] = {}
        self.cert_fetches: dict[str, int] = {}  # name → GETs, to see caching work

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
        field = "/purchase_units/@reference_id=='default'/amount/value"
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

    def _approve(self, order: dict[str, Any], decline: str | None) -> Response:
        if order["status"] not in ("CREATED", "PAYER_ACTION_REQUIRED", "APPROVED"):
            return Response(409, {"error": f"order is {order['status']}"})
        order["status"] = "APPROVED"
        order["_decline"] = decline
        order["payer"] = {
            "payer_id": "FAKEPAYER0001",
            "email_address": "buyer@example.com",
            "name": {"given_name": "Fake", "surname": "Buyer"},
        }
        return Response(200, self._public(order))

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
        amount = (body.get("amount") or {}).get("value")
        value = Decimal(amount) if amount else remaining
        if value > remaining or value <= 0:
            return _unprocessable(
                "REFUND_AMOUNT_EXCEEDED",
                "The refund amount must be less than or equal to the capture amount that has not yet been refunded.",
            )
        refund_id = _pid()
        refund = {
            "id": refund_id,
            "status": "COMPLETED",
            "_capture": capture["id"],
            "amount": {"currency_code": capture["amount"]["currency_code"], "value": str(value)},
            "custom_id": body.get("custom_id"),
            "create_time": _now(),
            "links": [
                {"href": f"{base}/v2/payments/refunds/{refund_id}", "rel": "self", "method": "GET"},
                {"href": f"{base}/v2/payments/captures/{capture['id']}", "rel": "up", "method": "GET"},
            ],
        }
        self.refunds[refund_id] = refund
        capture["status"] = "REFUNDED" if value == remaining else "PARTIALLY_REFUNDED"
        return Response(201, {k: v for k, v in refund.items() if not k.startswith("_") and v is not None})

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
        if path.startswith("approve/") and req.method == "POST":
            order = self.orders.get(path[len("approve/") :])
            if order is None:
                return _not_found()
            return self._approve(order, (req.json() or {}).get("decline") if req.body else None)
        if path == "checkoutnow" and req.method == "GET":
            order = self.orders.get((req.query.get("token") or [""])[0])
            if order is None:
                return _not_found()
            resp = self._approve(order, None)
            if resp.status == 200 and order["_return_url"]:
                sep = "&" if "?" in order["_return_url"] else "?"
                return Response(
                    302, "", {"Location": f"{order['_return_url']}{sep}token={order['id']}&PayerID=FAKEPAYER0001"}
                )
            return resp
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
        parser.add_argument("--client-id", dest="client_id", default=DEFAULT_CLIENT_ID)
        parser.add_argument("--client-secret", dest="client_secret", default=DEFAULT_CLIENT_SECRET)

    run_cli(FakePayPal, 12112, "fake PayPal API", options)


if __name__ == "__main__":
    main()
