"""A fake Stripe API for tests and local runs (standard library only).

Speaks enough of ``api.stripe.com`` for the ``stripe`` SDK:
``POST /v1/payment_intents`` (form-encoded, ``confirm=true``),
``GET /v1/payment_intents/{id}``, ``POST /v1/payment_intents/{id}/cancel``,
``POST /v1/refunds``, ``GET /v1/refunds/{id}``; the list endpoints
``GET /v1/payment_intents`` and ``GET /v1/refunds`` (newest first; ``limit``
1-100, default 10; ``starting_after``/``ending_before`` cursors;
``created[gt|gte|lt|lte]``; refunds also by ``payment_intent``), answering
Stripe's list object (``object: list``, ``url``, ``has_more``, ``data``), so
the SDK's ``auto_paging_iter`` pages through them; Bearer or Basic auth with the
API key; ``Idempotency-Key`` replay like Stripe (same key and parameters: the
stored answer with ``Idempotent-Replayed: true``; other parameters: 400
``idempotency_error``).

Test payment methods: ``pm_card_visa`` (and other plain ``pm_card_<brand>``)
succeed; ``pm_card_threeDSecure2Required`` / ``pm_card_authenticationRequired``
end in ``requires_action``; ``pm_card_chargeDeclined`` /
``pm_card_visa_chargeDeclined`` (and the ``…InsufficientFunds``,
``…ExpiredCard``, ``…Fraudulent``, ``…LostCard``, ``…StolenCard`` variants)
answer 402 ``card_error``; ``pm_fake_processing`` (fake only) ends in
``processing``.  A ``requires_action`` intent's ``next_action`` is Stripe's
``use_stripe_sdk`` (whose ``stripe_js`` URL is what Stripe.js opens), or
``redirect_to_url`` when the intent was confirmed with a ``return_url``; both
point at the fake's 3-D Secure page below.

Control endpoints, besides those of :mod:`common` (reset, faults, charges, log,
webhooks):

* ``POST /_fake/confirm/{pi_id}`` with optional ``{"outcome": "failed"}``
  finishes a ``requires_action``/``processing`` intent as the buyer or bank would;
* ``GET /_fake/3ds/{pi_id}[?client_secret=…&outcome=failed]`` — the 3-D Secure
  page a browser follows (``next_action``): the same, then a redirect to the
  ``return_url`` with ``payment_intent``, ``payment_intent_client_secret`` and
  ``redirect_status`` as Stripe does (no ``return_url``: a short text page).

* ``GET /_fake/refund/{pi_id}`` — the dashboard's "Refund payment": a tiny
  HTML form (``amount`` in minor units, default the rest not yet refunded);
  ``POST /_fake/refund/{pi_id}`` (form field or JSON ``amount``; empty or
  absent: the rest) refunds through the same code as ``POST /v1/refunds`` and
  answers ``{"refund": <Refund>, "payment_intent", "charge",
  "amount_refunded", "remaining"}`` (or the API's error: 400
  ``charge_already_refunded``, ``amount_too_large``; 404 for an unknown id).

The first two deliver the event Stripe sends (``payment_intent.succeeded`` or
``payment_intent.payment_failed``) when webhooks are configured: signed
``Stripe-Signature: t=…,v1=…`` with the endpoint secret, from a background
thread with retries (see :class:`common.WebhookSender`).  Every refund that
succeeds, through the API (the service's own included, as at Stripe; an
``Idempotency-Key`` replay is not a new refund and sends nothing) or the
dashboard page, sends ``charge.refunded`` whose ``data.object`` is the
PaymentIntent's ``latest_charge`` as a Charge: ``id``, ``object: "charge"``,
``amount``, ``amount_captured``, ``amount_refunded`` (every refund so far),
``refunded`` (true once in full), ``currency`` (lower case),
``payment_intent``, ``metadata`` (empty: Stripe does not copy the
PaymentIntent's metadata onto its charge), ``refunds`` (a list object, newest
first) and ``status: "succeeded"``.

Run: ``python scripts/fakes/fake_stripe.py --port 12111 [--api-key sk_test_…]
[--latency-ms 150] [--webhook-url URL --webhook-secret whsec_…]`` (defaults from
``FAKE_STRIPE_WEBHOOK_URL`` and ``FAKE_STRIPE_WEBHOOK_SECRET``; no URL, no
webhooks); in-process: ``server = serve(0)`` then ``server.url`` and
``server.stop()``; ``server.app.configure_webhooks(url, secret)``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode

try:  # run as a script or imported as scripts.fakes.fake_stripe
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

DEFAULT_API_KEY = "sk_test_local_fake"
#: the endpoint secret of config/config.yaml, so a local run verifies the fake's webhooks
DEFAULT_WEBHOOK_SECRET = "whsec_local_fake"
API_VERSION = "2024-06-20"
#: statuses of a refund that gives (or is giving) the money back
_REFUNDING = {"succeeded", "pending"}

_ACTION_METHODS = {"pm_card_threeDSecure2Required", "pm_card_authenticationRequired", "pm_card_threeDSecureRequired"}
_DECLINES = {  # payment method → (code, decline_code, message)
    "pm_card_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_visa_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "pm_card_visa_chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", "expired_card", "Your card has expired."),
    "pm_card_chargeDeclinedFraudulent": ("card_declined", "fraudulent", "Your card was declined."),
    "pm_card_chargeDeclinedLostCard": ("card_declined", "lost_card", "Your card was declined."),
    "pm_card_chargeDeclinedStolenCard": ("card_declined", "stolen_card", "Your card was declined."),
}
_PROCESSING_METHODS = {"pm_fake_processing"}
_CANCELABLE = {"requires_payment_method", "requires_capture", "requires_confirmation", "requires_action", "processing"}


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _error(status: int, type_: str, message: str, store: bool = False, **extra: Any) -> Response:
    return Response(status, {"error": {"type": type_, "message": message, **extra}}, store=store)


def stripe_signature(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """``Stripe-Signature`` of ``payload``: ``t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<payload>">``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class FakeStripe(FakeApp):
    """The state and endpoints of the fake Stripe account."""

    idempotency_header = "idempotency-key"
    replay_header = "Idempotent-Replayed"

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        webhook_url: str | None = None,
        webhook_secret: str = DEFAULT_WEBHOOK_SECRET,
        latency_ms: float = 0.0,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.latency = latency_ms / 1000.0
        self.intents: dict[str, dict[str, Any]] = {}  # in creation order
        self.refunds: dict[str, dict[str, Any]] = {}
        self.return_urls: dict[str, str] = {}  # intent id → return_url it was confirmed with
        self.webhook_secret = webhook_secret
        if webhook_url:
            self.configure_webhooks(webhook_url, webhook_secret)

    def configure_webhooks(self, url: str | None, secret: str = DEFAULT_WEBHOOK_SECRET) -> None:
        """Deliver events to ``url``, signed with the endpoint ``secret`` (None: deliver none)."""
        self.webhooks = WebhookSender(url) if url else None
        self.webhook_secret = secret

    def reset_provider(self) -> None:
        self.intents.clear()
        self.refunds.clear()
        self.return_urls.clear()

    # -- plumbing -----------------------------------------------------------
    def authenticate(self, req: Request) -> Response | None:
        auth = req.headers.get("authorization", "")
        key = ""
        if auth.startswith("Bearer "):
            key = auth[7:]
        elif auth.startswith("Basic "):
            key = base64.b64decode(auth[6:]).decode(errors="replace").split(":", 1)[0]
        if not key:
            return _error(401, "invalid_request_error", "You did not provide an API key.")
        if key != self.api_key:
            # Like Stripe: never echo the whole key.
            return _error(401, "invalid_request_error", f"Invalid API Key provided: {key[:8]}****{key[-4:]}")
        return None

    def fingerprint(self, req: Request) -> Any:
        return (req.method, req.path, sorted(parse_qsl(req.body.decode(), keep_blank_values=True)))

    def latency_for(self, req: Request) -> float:
        """Creating and confirming a PaymentIntent take ``latency`` (a card payment's round trip at Stripe)."""
        if req.method != "POST" or not self.latency:
            return 0.0
        parts = req.path.strip("/").split("/")
        creates = parts == ["v1", "payment_intents"]
        confirms = len(parts) == 4 and parts[:2] == ["v1", "payment_intents"] and parts[3] == "confirm"
        return self.latency if creates or confirms else 0.0

    def idempotency_conflict(self, req: Request) -> Response:
        key = req.headers.get(self.idempotency_header)
        return _error(
            400,
            "idempotency_error",
            "Keys for idempotent requests can only be used with the same parameters they were first used "
            f"with. Try using a key other than '{key}' if you meant to execute a different request.",
        )

    def fault_response(self, status: int) -> Response:
        if status == 429:
            return _error(429, "invalid_request_error", "Too many requests hit the API too quickly.", code="rate_limit")
        return _error(status, "api_error", "Something went wrong on Stripe's end. (injected)")

    def _finish(self, resp: Response) -> Response:
        resp.headers.setdefault("Request-Id", _new_id("req_"))
        return resp

    # -- endpoints ----------------------------------------------------------
    def handle_api(self, req: Request) -> Response:
        params = dict(parse_qsl(req.body.decode(), keep_blank_values=True))
        query = {k: v[-1] for k, v in req.query.items()}
        parts = req.path.strip("/").split("/")
        if parts[:2] == ["v1", "payment_intents"]:
            if len(parts) == 2 and req.method == "POST":
                return self._finish(self._create_intent(params, f"http://{req.host}"))
            if len(parts) == 2 and req.method == "GET":
                intents = list(reversed(self.intents.values()))
                return self._finish(self._list(intents, "/v1/payment_intents", query, "payment_intent"))
            intent = self.intents.get(parts[2]) if len(parts) > 2 else None
            if intent is None:
                return self._finish(self._missing("payment_intent", parts[2] if len(parts) > 2 else ""))
            if len(parts) == 3 and req.method == "GET":
                return self._finish(Response(200, intent))
            if len(parts) == 4 and parts[3] == "cancel" and req.method == "POST":
                return self._finish(self._cancel(intent, params))
        if parts[:2] == ["v1", "refunds"]:
            if len(parts) == 2 and req.method == "POST":
                return self._finish(self._refund(params))
            if len(parts) == 2 and req.method == "GET":
                refunds = [
                    r
                    for r in reversed(self.refunds.values())
                    if query.get("payment_intent") in (None, r["payment_intent"])
                    and query.get("charge") in (None, r["charge"])
                ]
                return self._finish(self._list(refunds, "/v1/refunds", query, "refund"))
            if len(parts) == 3 and req.method == "GET":
                refund = self.refunds.get(parts[2])
                return self._finish(Response(200, refund) if refund else self._missing("refund", parts[2]))
        return self._finish(
            _error(404, "invalid_request_error", f"Unrecognized request URL ({req.method}: {req.path}).")
        )

    @staticmethod
    def _missing(kind: str, ident: str) -> Response:
        return _error(404, "invalid_request_error", f"No such {kind}: '{ident}'", code="resource_missing", param="id")

    @staticmethod
    def _list(items: list[dict[str, Any]], url: str, query: dict[str, str], kind: str) -> Response:
        """Stripe's list object over ``items`` (newest first), with its filters and cursors."""
        try:
            limit = int(query.get("limit", "10"))
            bounds = {
                op: int(query[f"created[{op}]"]) for op in ("gt", "gte", "lt", "lte") if f"created[{op}]" in query
            }
            exact = int(query["created"]) if "created" in query else None
        except ValueError:
            return _error(
                400, "invalid_request_error", "Invalid integer in limit or created.", code="parameter_invalid_integer"
            )
        if not 1 <= limit <= 100:
            return _error(
                400,
                "invalid_request_error",
                "This value must be greater than or equal to 1 and less than or equal to 100.",
                param="limit",
            )
        tests = {
            "gt": lambda c, v: c > v,
            "gte": lambda c, v: c >= v,
            "lt": lambda c, v: c < v,
            "lte": lambda c, v: c <= v,
        }

        def wanted(item: dict[str, Any]) -> bool:
            created = item["created"]
            return (exact is None or created == exact) and all(tests[op](created, v) for op, v in bounds.items())

        ids = [item["id"] for item in items]
        after, before = query.get("starting_after"), query.get("ending_before")
        for param, cursor in (("starting_after", after), ("ending_before", before)):
            if cursor is not None and cursor not in ids:
                return _error(
                    400, "invalid_request_error", f"No such {kind}: '{cursor}'", code="resource_missing", param=param
                )
        if after is not None:
            remaining = [i for i in items[ids.index(after) + 1 :] if wanted(i)]
            page, has_more = remaining[:limit], len(remaining) > limit
        elif before is not None:
            remaining = [i for i in items[: ids.index(before)] if wanted(i)]
            page, has_more = remaining[-limit:], len(remaining) > limit
        else:
            remaining = [i for i in items if wanted(i)]
            page, has_more = remaining[:limit], len(remaining) > limit
        return Response(200, {"object": "list", "url": url, "has_more": has_more, "data": page})

    def _create_intent(self, params: dict[str, str], base: str = "") -> Response:
        try:
            amount = int(params.get("amount", ""))
        except ValueError:
            return _error(
                400,
                "invalid_request_error",
                "Invalid integer: amount",
                code="parameter_invalid_integer",
                param="amount",
            )
        currency = params.get("currency", "").lower()
        if amount < 1 or len(currency) != 3:
            return _error(
                400, "invalid_request_error", "Invalid amount or currency.", code="parameter_invalid", param="amount"
            )
        method = params.get("payment_method")
        known = (
            method is None
            or method in _ACTION_METHODS | _DECLINES.keys() | _PROCESSING_METHODS
            or (method.startswith("pm_card_") and "Declined" not in method)
        )
        if not known:
            return _error(
                400,
                "invalid_request_error",
                f"No such PaymentMethod: '{method}'",
                code="resource_missing",
                param="payment_method",
            )
        confirm = params.get("confirm") == "true"
        if confirm and not method:
            return _error(
                400,
                "invalid_request_error",
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                code="payment_intent_unexpected_state",
            )
        pi_id = _new_id("pi_")
        intent: dict[str, Any] = {
            "id": pi_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_received": 0,
            "capture_method": params.get("capture_method", "automatic"),
            "client_secret": f"{pi_id}_secret_{uuid.uuid4().hex[:20]}",
            "confirmation_method": "automatic",
            "created": int(time.time()),
            "currency": currency,
            "description": params.get("description"),
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": {k[9:-1]: v for k, v in params.items() if k.startswith("metadata[")},
            "next_action": None,
            "payment_method": method,
            "payment_method_types": ["card"],
            "status": "requires_confirmation" if method else "requires_payment_method",
            "canceled_at": None,
            "cancellation_reason": None,
        }
        self.intents[pi_id] = intent
        if not confirm:
            return Response(200, intent)
        if method in _DECLINES:
            code, decline_code, message = _DECLINES[method]
            intent["status"] = "requires_payment_method"
            intent["last_payment_error"] = {
                "type": "card_error",
                "code": code,
                "decline_code": decline_code,
                "message": message,
                "payment_method": {"id": method, "object": "payment_method", "type": "card"},
            }
            intent["latest_charge"] = _new_id("ch_")
            # A decline is an executed request: Stripe stores and replays it.
            return _error(
                402,
                "card_error",
                message,
                store=True,
                code=code,
                decline_code=decline_code,
                charge=intent["latest_charge"],
                payment_intent=intent,
            )
        if method in _ACTION_METHODS:
            intent["status"] = "requires_action"
            page = f"{base}/_fake/3ds/{pi_id}?" + urlencode({"client_secret": intent["client_secret"]})
            return_url = params.get("return_url")
            if return_url:
                self.return_urls[pi_id] = return_url
                intent["next_action"] = {
                    "type": "redirect_to_url",
                    "redirect_to_url": {"url": page, "return_url": return_url},
                }
            else:
                intent["next_action"] = {
                    "type": "use_stripe_sdk",
                    "use_stripe_sdk": {"type": "three_d_secure_redirect", "stripe_js": page, "source": _new_id("src_")},
                }
        elif method in _PROCESSING_METHODS:
            intent["status"] = "processing"
        else:
            self._succeed(intent)
        return Response(200, intent)

    @staticmethod
    def _succeed(intent: dict[str, Any]) -> None:
        intent.update(
            status="succeeded",
            amount_received=intent["amount"],
            next_action=None,
            latest_charge=_new_id("ch_"),
            last_payment_error=None,
        )

    def _cancel(self, intent: dict[str, Any], params: dict[str, str]) -> Response:
        if intent["status"] == "canceled" or intent["status"] not in _CANCELABLE:
            return _error(
                400,
                "invalid_request_error",
                f"You cannot cancel this PaymentIntent because it has a status of {intent['status']}. Only a "
                "PaymentIntent with one of the following statuses may be canceled: "
                + ", ".join(sorted(_CANCELABLE))
                + ".",
                store=True,
                code="payment_intent_unexpected_state",
                payment_intent=intent,
            )
        intent.update(
            status="canceled",
            canceled_at=int(time.time()),
            next_action=None,
            cancellation_reason=params.get("cancellation_reason"),
        )
        return Response(200, intent)

    def _refunded(self, pi_id: str) -> int:
        return sum(
            r["amount"] for r in self.refunds.values() if r["payment_intent"] == pi_id and r["status"] in _REFUNDING
        )

    def _refund(self, params: dict[str, str]) -> Response:
        pi_id = params.get("payment_intent", "")
        intent = self.intents.get(pi_id)
        if intent is None:
            return _error(
                400,
                "invalid_request_error",
                f"No such payment_intent: '{pi_id}'",
                code="resource_missing",
                param="payment_intent",
            )
        if intent["status"] != "succeeded":
            return _error(
                400,
                "invalid_request_error",
                f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.",
                store=True,
                code="charge_not_refundable",
            )
        remaining = intent["amount_received"] - self._refunded(pi_id)
        try:
            amount = int(params.get("amount", remaining))
        except ValueError:
            return _error(
                400,
                "invalid_request_error",
                "Invalid integer: amount",
                code="parameter_invalid_integer",
                param="amount",
            )
        if remaining <= 0:
            return _error(
                400,
                "invalid_request_error",
                f"Charge {intent['latest_charge']} has already been refunded.",
                store=True,
                code="charge_already_refunded",
            )
        if amount > remaining or amount < 1:
            return _error(
                400,
                "invalid_request_error",
                "Refund amount is greater than the unrefunded amount on the charge.",
                store=True,
                code="amount_too_large",
                param="amount",
            )
        refund = {
            "id": _new_id("re_"),
            "object": "refund",
            "amount": amount,
            "currency": intent["currency"],
            "charge": intent["latest_charge"],
            "payment_intent": pi_id,
            "status": "succeeded",
            "reason": params.get("reason"),
            "created": int(time.time()),
            "metadata": {k[9:-1]: v for k, v in params.items() if k.startswith("metadata[")},
        }
        self.refunds[refund["id"]] = refund
        # Stripe tells the account's endpoint about every refund, whoever made it (API or dashboard).
        self.send_event("charge.refunded", self._charge(intent))
        return Response(200, refund)

    def _charge(self, intent: dict[str, Any]) -> dict[str, Any]:
        """The PaymentIntent's ``latest_charge`` as a Charge object, with its refunds so far.

        Stripe does not copy the PaymentIntent's metadata onto the charge, so the
        charge's ``metadata`` is empty (the fake has no way to give a charge some).
        """
        charge_id = intent["latest_charge"]
        refunds = [r for r in reversed(self.refunds.values()) if r["charge"] == charge_id]  # newest first
        refunded = sum(r["amount"] for r in refunds if r["status"] in _REFUNDING)
        captured = intent["amount_received"]
        return {
            "id": charge_id,
            "object": "charge",
            "amount": intent["amount"],
            "amount_captured": captured,
            "amount_refunded": refunded,
            "balance_transaction": None,
            "captured": True,
            "created": intent["created"],
            "currency": intent["currency"],
            "description": intent["description"],
            "disputed": False,
            "failure_code": None,
            "failure_message": None,
            "livemode": False,
            "metadata": {},
            "paid": True,
            "payment_intent": intent["id"],
            "payment_method": intent["payment_method"],
            "refunded": refunded >= captured,
            "refunds": {
                "object": "list",
                "data": copy.deepcopy(refunds),
                "has_more": False,
                "total_count": len(refunds),
                "url": f"/v1/charges/{charge_id}/refunds",
            },
            "status": "succeeded",
        }

    # -- control ------------------------------------------------------------
    def handle_control(self, req: Request, path: str) -> Response | None:
        if path.startswith("confirm/") and req.method == "POST":
            intent = self.intents.get(path[len("confirm/") :])
            if intent is None:
                return Response(404, {"error": "no such payment intent"})
            if intent["status"] not in ("requires_action", "processing"):
                return Response(409, {"error": f"intent is {intent['status']}"})
            self._authenticate(intent, (req.json() or {}).get("outcome", "succeeded") != "failed")
            return Response(200, intent)
        if path.startswith("3ds/") and req.method == "GET":
            return self._three_d_secure_page(req, path[len("3ds/") :])
        if path.startswith("refund/") and req.method in ("GET", "POST"):
            return self._dashboard_refund(req, path[len("refund/") :])
        return None

    def _dashboard_refund(self, req: Request, pi_id: str) -> Response:
        """The dashboard's "Refund payment": GET a form, POST refunds (the API's code: the webhook goes out)."""
        intent = self.intents.get(pi_id)
        if intent is None:
            return self._missing("payment_intent", pi_id)
        remaining = intent["amount_received"] - self._refunded(pi_id)
        if req.method == "GET":
            return refund_form(
                f"Refund {pi_id}",
                f"{intent['amount_received']} {intent['currency']} taken, {remaining} refundable "
                f"(status {intent['status']}).",
                "amount (minor units)",
                str(remaining) if remaining > 0 else "",
            )
        amount = form_field(req, "amount")
        params = {"payment_intent": pi_id, **({"amount": amount} if amount else {})}
        resp = self._refund(params)
        if resp.status != 200:
            return resp
        refunded = self._refunded(pi_id)
        return Response(
            200,
            {
                "refund": resp.body,
                "payment_intent": pi_id,
                "charge": intent["latest_charge"],
                "amount_refunded": refunded,
                "remaining": intent["amount_received"] - refunded,
            },
        )

    def _authenticate(self, intent: dict[str, Any], passed: bool) -> None:
        """The buyer finishes (or fails) 3-D Secure; Stripe then sends its event."""
        if passed:
            self._succeed(intent)
        else:
            intent.update(
                status="requires_payment_method",
                next_action=None,
                last_payment_error={
                    "type": "card_error",
                    "code": "payment_intent_authentication_failure",
                    "message": "The provided PaymentMethod has failed authentication.",
                },
            )
        self.send_event("payment_intent.succeeded" if passed else "payment_intent.payment_failed", intent)

    def _three_d_secure_page(self, req: Request, pi_id: str) -> Response:
        """What the browser opens from ``next_action``: authenticates, then goes back to the shop."""
        intent = self.intents.get(pi_id)
        secret = (req.query.get("client_secret") or [None])[0]
        if intent is None or secret not in (None, intent["client_secret"]):
            return Response(404, "No such payment intent.\n")
        if intent["status"] not in ("requires_action", "processing"):
            return Response(409, f"This PaymentIntent is {intent['status']}: nothing to authenticate.\n")
        passed = (req.query.get("outcome") or ["succeeded"])[0] != "failed"
        self._authenticate(intent, passed)
        return_url = self.return_urls.get(pi_id)
        if return_url:
            query = urlencode(
                {
                    "payment_intent": pi_id,
                    "payment_intent_client_secret": intent["client_secret"],
                    "redirect_status": "succeeded" if passed else "failed",
                }
            )
            return Response(302, "", {"Location": f"{return_url}{'&' if '?' in return_url else '?'}{query}"})
        outcome = "succeeded" if passed else "failed"
        return Response(200, f"3-D Secure authentication {outcome} for {pi_id}. You can close this window.\n")

    def send_event(self, event_type: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Deliver a signed event about ``obj`` to the configured endpoint; the event, or None when none is configured."""
        if self.webhooks is None:
            return None
        event = {
            "id": _new_id("evt_"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
        body = json.dumps(event).encode()
        secret = self.webhook_secret
        self.webhooks.send(event["id"], event_type, body, lambda: {"Stripe-Signature": stripe_signature(body, secret)})
        return event

    def charges(self) -> dict[str, Any]:
        orders: dict[str, dict[str, int]] = {}
        for intent in self.intents.values():
            order_id = intent["metadata"].get("order_id", "")
            entry = orders.setdefault(
                order_id, {"payment_intents": 0, "charges": 0, "amount_charged": 0, "refunds": 0, "amount_refunded": 0}
            )
            entry["payment_intents"] += 1
            if intent["status"] == "succeeded":
                entry["charges"] += 1
                entry["amount_charged"] += intent["amount_received"]
        for refund in self.refunds.values():
            order_id = self.intents[refund["payment_intent"]]["metadata"].get("order_id", "")
            orders[order_id]["refunds"] += 1
            orders[order_id]["amount_refunded"] += refund["amount"]
        return {"orders": orders}


def serve(
    port: int = 0,
    host: str = "127.0.0.1",
    api_key: str = DEFAULT_API_KEY,
    verbose: bool = False,
    latency_ms: float = 0.0,
) -> FakeServer:
    """Start the fake in a daemon thread and return the running server.

    ``port=0`` picks a free port (read ``server.url``); ``server.app`` is the
    :class:`FakeStripe`; ``server.stop()`` shuts it down.  ``latency_ms``: see
    ``--latency-ms``.
    """
    return start(FakeStripe(api_key=api_key, latency_ms=latency_ms), port, host, verbose)


def main() -> None:
    """Command line: serve in the foreground."""

    def options(parser: Any) -> None:
        parser.add_argument("--api-key", dest="api_key", default=DEFAULT_API_KEY)
        parser.add_argument(
            "--webhook-url",
            dest="webhook_url",
            default=os.environ.get("FAKE_STRIPE_WEBHOOK_URL") or None,
            help="deliver events here (default: $FAKE_STRIPE_WEBHOOK_URL; none: no webhooks)",
        )
        parser.add_argument(
            "--webhook-secret",
            dest="webhook_secret",
            default=os.environ.get("FAKE_STRIPE_WEBHOOK_SECRET") or DEFAULT_WEBHOOK_SECRET,
            help="endpoint secret the events are signed with (default: $FAKE_STRIPE_WEBHOOK_SECRET or whsec_local_fake)",
        )

        parser.add_argument(
            "--latency-ms",
            dest="latency_ms",
            type=float,
            default=0.0,
            help="creating and confirming a PaymentIntent takes this long, as at the real Stripe (default 0; "
            "other requests are served meanwhile; POST /_fake/latency changes it at run time)",
        )

    run_cli(FakeStripe, 12111, "fake Stripe API", options)


if __name__ == "__main__":
    main()
