"""A fake Stripe API for tests and local runs (standard library only).

Speaks enough of ``api.stripe.com`` for the ``stripe`` SDK:
``POST /v1/payment_intents`` (form-encoded, ``confirm=true``),
``GET /v1/payment_intents/{id}``, ``POST /v1/payment_intents/{id}/cancel``,
``POST /v1/refunds``, ``GET /v1/refunds/{id}``; Bearer or Basic auth with the
API key; ``Idempotency-Key`` replay like Stripe (same key and parameters: the
stored answer with ``Idempotent-Replayed: true``; other parameters: 400
``idempotency_error``).

Test payment methods: ``pm_card_visa`` (and other plain ``pm_card_<brand>``)
succeed; ``pm_card_threeDSecure2Required`` / ``pm_card_authenticationRequired``
end in ``requires_action``; ``pm_card_chargeDeclined`` /
``pm_card_visa_chargeDeclined`` (and the ``…InsufficientFunds``,
``…ExpiredCard``, ``…Fraudulent``, ``…LostCard``, ``…StolenCard`` variants)
answer 402 ``card_error``; ``pm_fake_processing`` (fake only) ends in
``processing``.

Control endpoints, besides those of :mod:`common` (reset, faults, charges, log):
``POST /_fake/confirm/{pi_id}`` with optional ``{"outcome": "failed"}``
finishes a ``requires_action``/``processing`` intent as the buyer or bank would.

Run: ``python scripts/fakes/fake_stripe.py --port 12111 [--api-key sk_test_…]``;
in-process: ``server = serve(0)`` then ``server.url`` and ``server.stop()``.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

try:  # run as a script or imported as scripts.fakes.fake_stripe
    from .common import FakeApp, FakeServer, Request, Response, run_cli, start
except ImportError:  # pragma: no cover - script mode
    from common import FakeApp, FakeServer, Request, Response, run_cli, start  # type: ignore[no-redef]

DEFAULT_API_KEY = "sk_test_local_fake"

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


class FakeStripe(FakeApp):
    """The state and endpoints of the fake Stripe account."""

    idempotency_header = "idempotency-key"
    replay_header = "Idempotent-Replayed"

    def __init__(self, api_key: str = DEFAULT_API_KEY) -> None:
        super().__init__()
        self.api_key = api_key
        self.intents: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}

    def reset_provider(self) -> None:
        self.intents.clear()
        self.refunds.clear()

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
        parts = req.path.strip("/").split("/")
        if parts[:2] == ["v1", "payment_intents"]:
            if len(parts) == 2 and req.method == "POST":
                return self._finish(self._create_intent(params))
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
            if len(parts) == 3 and req.method == "GET":
                refund = self.refunds.get(parts[2])
                return self._finish(Response(200, refund) if refund else self._missing("refund", parts[2]))
        return self._finish(
            _error(404, "invalid_request_error", f"Unrecognized request URL ({req.method}: {req.path}).")
        )

    @staticmethod
    def _missing(kind: str, ident: str) -> Response:
        return _error(404, "invalid_request_error", f"No such {kind}: '{ident}'", code="resource_missing", param="id")

    def _create_intent(self, params: dict[str, str]) -> Response:
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
            intent["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}}
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
        return sum(r["amount"] for r in self.refunds.values() if r["payment_intent"] == pi_id)

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
        amount = int(params.get("amount", remaining))
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
        return Response(200, refund)

    # -- control ------------------------------------------------------------
    def handle_control(self, req: Request, path: str) -> Response | None:
        if path.startswith("confirm/") and req.method == "POST":
            intent = self.intents.get(path[len("confirm/") :])
            if intent is None:
                return Response(404, {"error": "no such payment intent"})
            if intent["status"] not in ("requires_action", "processing"):
                return Response(409, {"error": f"intent is {intent['status']}"})
            outcome = (req.json() or {}).get("outcome", "succeeded")
            if outcome == "failed":
                intent.update(
                    status="requires_payment_method",
                    next_action=None,
                    last_payment_error={
                        "type": "card_error",
                        "code": "payment_intent_authentication_failure",
                        "message": "The provided PaymentMethod has failed authentication.",
                    },
                )
            else:
                self._succeed(intent)
            return Response(200, intent)
        return None

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


def serve(port: int = 0, host: str = "127.0.0.1", api_key: str = DEFAULT_API_KEY, verbose: bool = False) -> FakeServer:
    """Start the fake in a daemon thread and return the running server.

    ``port=0`` picks a free port (read ``server.url``); ``server.app`` is the
    :class:`FakeStripe`; ``server.stop()`` shuts it down.
    """
    return start(FakeStripe(api_key=api_key), port, host, verbose)


def main() -> None:
    """Command line: serve in the foreground."""
    run_cli(
        FakeStripe,
        12111,
        "fake Stripe API",
        lambda p: p.add_argument("--api-key", dest="api_key", default=DEFAULT_API_KEY),
    )


if __name__ == "__main__":
    main()
