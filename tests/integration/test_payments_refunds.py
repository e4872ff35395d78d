"""Refunds at the providers: the fakes send the refund webhooks, the gateways read them and report refunds.

Every refund at a fake, through the API (the service's own RefundPayment among them) or its dashboard
page (``/_fake/refund/{id}``), sends the provider's signed event (Stripe ``charge.refunded``, PayPal
``PAYMENT.CAPTURE.REFUNDED``) to an endpoint of this module; the real gateways verify the deliveries as
received (the ``stripe`` SDK's signature check; PayPal's certificate chain fetched over https from the
fake and the SHA256withRSA signature) and translate them to REFUNDED, and their ``lookup`` reports what
was given back (``refunded``, ``refund_ids``), read through the SDKs.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the fakes live in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from handlers.payments.base import (  # noqa: E402
    PaymentFacts,
    PaymentOutcome,
    PaymentRequest,
    PaymentResult,
    TransientPaymentError,
    WebhookEvent,
    WebhookKind,
)
from handlers.payments.paypal_gateway import PayPalGateway  # noqa: E402
from handlers.payments.settings import PayPalSettings, StripeSettings  # noqa: E402
from handlers.payments.stripe_gateway import StripeGateway  # noqa: E402
from scripts.fakes import fake_paypal, fake_stripe, paypal_certs  # noqa: E402
from scripts.fakes.common import tls_context  # noqa: E402
from tests.support import wait_until  # noqa: E402

STRIPE_SECRET = "whsec_refund_tests"
PAYPAL_WEBHOOK_ID = "REFUND-TESTS-WEBHOOK"


@dataclass(frozen=True)
class Delivery:
    """One webhook POST as the endpoint received it."""

    body: bytes
    headers: dict[str, str]

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def event_type(self) -> str:
        event = self.event
        return str(event.get("type") or event.get("event_type"))


class Endpoint:
    """The shop's webhook endpoint: keeps every delivery, answers 200."""

    def __init__(self) -> None:
        self.received: list[Delivery] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with endpoint.lock:
                    endpoint.received.append(Delivery(body, dict(self.headers.items())))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def of_type(self, event_type: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.received if d.event_type == event_type]

    def wait_for(self, event_type: str, count: int) -> list[Delivery]:
        """The first ``count`` deliveries of ``event_type``, once that many have arrived."""
        found = wait_until(
            lambda: (lambda seen: seen if len(seen) >= count else None)(self.of_type(event_type)),
            timeout=15,
            what=f"{count} {event_type} deliveries",
        )
        return list(found)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint()
    yield ep
    ep.stop()


# -- Stripe ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def stripe_server(endpoint: Endpoint) -> Iterator[Any]:
    server = fake_stripe.serve(0)
    server.app.configure_webhooks(endpoint.url, STRIPE_SECRET)
    yield server
    server.stop()


@pytest.fixture
def stripe_fake(stripe_server: Any, endpoint: Endpoint) -> Any:
    httpx.post(stripe_server.url + "/_fake/reset").raise_for_status()
    endpoint.clear()
    return stripe_server


@pytest.fixture
def stripe_gateway(stripe_fake: Any) -> Callable[..., StripeGateway]:
    def make(**overrides: Any) -> StripeGateway:
        values: dict[str, Any] = {
            "api_key": fake_stripe.DEFAULT_API_KEY,
            "webhook_secret": STRIPE_SECRET,
            "api_base": stripe_fake.url,
            "timeout_seconds": 5,
            **overrides,
        }
        return StripeGateway(StripeSettings(**values))

    return make


def stripe_paid(gateway: StripeGateway, order_id: str = "order-r1", amount: int = 1099) -> str:
    result = gateway.start(
        PaymentRequest(
            order_id=order_id,
            amount=amount,
            currency="EUR",
            idempotency_key=f"pay-{order_id}",
            payment_method="pm_card_visa",
        )
    )
    assert result.outcome is PaymentOutcome.SUCCEEDED
    return result.provider_payment_id


def test_stripe_refunds_through_the_api_send_signed_charge_refunded_events(
    stripe_fake: Any, stripe_gateway: Callable[..., StripeGateway], endpoint: Endpoint
) -> None:
    gateway = stripe_gateway()
    pi_id = stripe_paid(gateway)
    paid = PaymentResult(PaymentOutcome.SUCCEEDED, pi_id)
    assert endpoint.of_type("charge.refunded") == []  # a payment is not a refund

    part = gateway.refund(paid, 400, "EUR", "refund-part")  # what the service's RefundPayment calls
    [first] = endpoint.wait_for("charge.refunded", 1)
    event = gateway.parse_webhook(first.body, first.headers)  # the stripe SDK verifies Stripe-Signature
    assert event == WebhookEvent(
        kind=WebhookKind.REFUNDED,
        provider="stripe",
        event_id=first.event["id"],
        event_type="charge.refunded",
        order_id=None,  # Stripe does not copy the PaymentIntent's metadata onto its charge
        provider_payment_id=pi_id,
        amount=400,
        currency="EUR",
    )
    charge = first.event["data"]["object"]
    intent = stripe_fake.app.intents[pi_id]
    assert {k: charge[k] for k in ("id", "object", "amount", "amount_captured", "amount_refunded", "refunded")} == {
        "id": intent["latest_charge"],
        "object": "charge",
        "amount": 1099,
        "amount_captured": 1099,
        "amount_refunded": 400,
        "refunded": False,
    }
    assert (charge["currency"], charge["payment_intent"], charge["metadata"], charge["status"]) == (
        "eur",
        pi_id,
        {},
        "succeeded",
    )
    assert charge["refunds"]["object"] == "list" and [r["id"] for r in charge["refunds"]["data"]] == [part.refund_id]

    # the same key again is Stripe's first answer replayed: no second refund, no second event
    assert gateway.refund(paid, 400, "EUR", "refund-part") == part
    assert [d["event_type"] for d in stripe_fake.app.webhooks.snapshot()] == ["charge.refunded"]
    rest = gateway.refund(paid, 699, "EUR", "refund-rest")
    second = endpoint.wait_for("charge.refunded", 2)[1]
    assert gateway.parse_webhook(second.body, second.headers).amount == 1099  # cumulative: amount_refunded
    charge = second.event["data"]["object"]
    assert (charge["amount_refunded"], charge["refunded"]) == (1099, True)
    assert [r["id"] for r in charge["refunds"]["data"]] == [rest.refund_id, part.refund_id]  # newest first
    assert len(endpoint.of_type("charge.refunded")) == 2


def test_the_stripe_dashboard_page_refunds_and_the_webhook_goes_out(
    stripe_fake: Any, stripe_gateway: Callable[..., StripeGateway], endpoint: Endpoint
) -> None:
    gateway = stripe_gateway()
    pi_id = stripe_paid(gateway)
    page = f"{stripe_fake.url}/_fake/refund/{pi_id}"
    form = httpx.get(page)
    assert form.status_code == 200 and form.headers["content-type"].startswith("text/html")
    assert '<form method="post">' in form.text and 'name="amount" value="1099"' in form.text

    done = httpx.post(page, data={"amount": "300"})  # what the browser posts
    assert done.status_code == 200, done.text
    assert (done.json()["refund"]["amount"], done.json()["amount_refunded"], done.json()["remaining"]) == (
        300,
        300,
        799,
    )
    [first] = endpoint.wait_for("charge.refunded", 1)
    assert gateway.parse_webhook(first.body, first.headers).amount == 300
    assert 'value="799"' in httpx.get(page).text

    rest = httpx.post(page, data={"amount": ""})  # empty: the rest
    assert rest.status_code == 200 and rest.json()["refund"]["amount"] == 799 and rest.json()["remaining"] == 0
    event = gateway.parse_webhook(*_parts(endpoint.wait_for("charge.refunded", 2)[1]))
    assert (event.kind, event.provider_payment_id, event.amount) == (WebhookKind.REFUNDED, pi_id, 1099)

    again = httpx.post(page, json={"amount": 1})
    assert again.status_code == 400 and again.json()["error"]["code"] == "charge_already_refunded"
    assert httpx.get(f"{stripe_fake.url}/_fake/refund/pi_unknown").status_code == 404
    # the dashboard's refunds are the account's: the API lists them
    assert gateway.lookup(pi_id).refunded == 1099


def _parts(delivery: Delivery) -> tuple[bytes, dict[str, str]]:
    return delivery.body, delivery.headers


def test_stripe_lookup_reports_the_refunds_oldest_first(
    stripe_fake: Any, stripe_gateway: Callable[..., StripeGateway]
) -> None:
    gateway = stripe_gateway()
    pi_id = stripe_paid(gateway, "order-facts")
    paid = PaymentResult(PaymentOutcome.SUCCEEDED, pi_id)
    untouched = PaymentFacts(
        provider_payment_id=pi_id, taken=True, order_id="order-facts", amount=1099, currency="EUR", status="succeeded"
    )
    assert gateway.lookup(pi_id) == untouched
    first = gateway.refund(paid, 100, "EUR", "r1").refund_id
    assert gateway.lookup(pi_id) == PaymentFacts(
        **{**untouched.__dict__, "refunded": 100, "refund_ids": (first,)}  # partial: still taken
    )
    second = gateway.refund(paid, 200, "EUR", "r2").refund_id  # same second as the first: the listing's order holds
    third = gateway.refund(paid, 799, "EUR", "r3").refund_id
    full = gateway.lookup(pi_id)
    assert (full.taken, full.status, full.amount) == (True, "succeeded", 1099)  # a refunded payment was taken
    assert (full.refunded, full.refund_ids) == (1099, (first, second, third))
    # a refund that failed gave nothing back; a pending one is on its way
    stripe_fake.app.refunds[second]["status"] = "failed"
    stripe_fake.app.refunds[third]["status"] = "pending"
    assert (gateway.lookup(pi_id).refunded, gateway.lookup(pi_id).refund_ids) == (899, (first, third))


def test_stripe_lookup_asks_for_refunds_only_of_a_succeeded_intent(
    stripe_fake: Any, stripe_gateway: Callable[..., StripeGateway]
) -> None:
    gateway = stripe_gateway()
    result = gateway.start(
        PaymentRequest("order-3ds", 1099, "EUR", "pay-3ds", payment_method="pm_card_threeDSecure2Required")
    )
    facts = gateway.lookup(result.provider_payment_id)
    assert (facts.taken, facts.refunded, facts.refund_ids) == (False, 0, ())
    paths = [e["path"] for e in httpx.get(stripe_fake.url + "/_fake/log").json()["requests"]]
    assert "/v1/refunds" not in paths


def test_stripe_lookup_of_the_refunds_maps_errors_like_the_other_calls(
    stripe_fake: Any, stripe_gateway: Callable[..., StripeGateway]
) -> None:
    gateway = stripe_gateway(max_network_retries=0)
    pi_id = stripe_paid(gateway)
    httpx.post(stripe_fake.url + "/_fake/faults", json={"count": 1, "status": 503, "path": "/v1/refunds"})
    with pytest.raises(TransientPaymentError):
        gateway.lookup(pi_id)
    assert gateway.lookup(pi_id).refunded == 0


# -- PayPal ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def authority() -> paypal_certs.TestAuthority:
    return paypal_certs.TestAuthority("Refund tests PayPal Root CA")


@pytest.fixture(scope="module")
def paypal_server(
    endpoint: Endpoint, authority: paypal_certs.TestAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    server = fake_paypal.serve(0)
    cert, key = paypal_certs.write_tls(authority.tls_cert(), tmp_path_factory.mktemp("paypal-tls"))
    secure = fake_paypal.serve(0, tls=tls_context(str(cert), str(key)), app=server.app)
    server.app.tls_url = secure.url  # the events' PAYPAL-CERT-URL: the signing certificate over https
    server.cert_origin = secure.url.removeprefix("https://")  # 127.0.0.1:<port>, allowed by name (PayPal's is 443)
    server.app.configure_webhooks(endpoint.url, authority.signing_cert(), PAYPAL_WEBHOOK_ID)
    yield server
    secure.stop()
    server.stop()


@pytest.fixture
def paypal_fake(paypal_server: Any, endpoint: Endpoint) -> Any:
    httpx.post(paypal_server.url + "/_fake/reset").raise_for_status()
    endpoint.clear()
    return paypal_server


@pytest.fixture
def paypal_gateway(
    paypal_fake: Any, authority: paypal_certs.TestAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., PayPalGateway]:
    ca = authority.write_ca(tmp_path_factory.mktemp("paypal-ca") / "roots.pem")

    def make(**overrides: Any) -> PayPalGateway:
        values: dict[str, Any] = {
            "client_id": fake_paypal.DEFAULT_CLIENT_ID,
            "client_secret": fake_paypal.DEFAULT_CLIENT_SECRET,
            "base_url": paypal_fake.url,
            "webhook_id": PAYPAL_WEBHOOK_ID,
            "cert_host_allowlist": (paypal_fake.cert_origin,),  # the fake's https port (PayPal's is 443)
            "cert_ca_file": str(ca),
            "timeout_seconds": 5,
            **overrides,
        }
        return PayPalGateway(PayPalSettings(**values))

    return make


def paypal_captured(
    fake: Any, gateway: PayPalGateway, order_id: str = "order-r1", amount: int = 1099, currency: str = "USD"
) -> PaymentResult:
    started = gateway.start(
        PaymentRequest(order_id, amount, currency, f"pay-{order_id}", return_url="https://shop.example/back")
    )
    httpx.post(f"{fake.url}/_fake/approve/{started.provider_payment_id}").raise_for_status()
    captured = gateway.capture(started.provider_payment_id, f"capture-{order_id}")
    assert captured.outcome is PaymentOutcome.SUCCEEDED and captured.capture_id
    return captured


def test_paypal_refunds_through_the_api_send_signed_capture_refunded_events(
    paypal_fake: Any, paypal_gateway: Callable[..., PayPalGateway], endpoint: Endpoint
) -> None:
    gateway = paypal_gateway()
    captured = paypal_captured(paypal_fake, gateway)
    assert endpoint.of_type("PAYMENT.CAPTURE.REFUNDED") == []

    part = gateway.refund(captured, 400, "USD", "refund-part")  # what the service's RefundPayment calls
    [first] = endpoint.wait_for("PAYMENT.CAPTURE.REFUNDED", 1)
    # verified as PayPal's: the certificate fetched over https, chained to the CA, the signature over the body
    event = gateway.parse_webhook(first.body, first.headers)
    assert event == WebhookEvent(
        kind=WebhookKind.REFUNDED,
        provider="paypal",
        event_id=first.event["id"],
        event_type="PAYMENT.CAPTURE.REFUNDED",
        order_id=None,  # no custom_id was given at refund time
        provider_payment_id=None,  # a refund names its capture, not the order
        amount=400,  # this refund's
        currency="USD",
        capture_id=captured.capture_id,
    )
    resource = first.event["resource"]
    assert (resource["id"], resource["status"], resource["amount"]) == (
        part.refund_id,
        "COMPLETED",
        {"currency_code": "USD", "value": "4.00"},
    )
    assert "custom_id" not in resource and "supplementary_data" not in resource
    assert resource["seller_payable_breakdown"]["total_refunded_amount"]["value"] == "4.00"
    [up] = [link for link in resource["links"] if link["rel"] == "up"]
    assert up["href"] == f"{paypal_fake.url}/v2/payments/captures/{captured.capture_id}"
    assert first.event["resource_type"] == "refund"
    assert paypal_fake.app.captures[captured.capture_id]["status"] == "PARTIALLY_REFUNDED"

    # the same PayPal-Request-Id again replays PayPal's first answer: no second refund, no second event
    assert gateway.refund(captured, 400, "USD", "refund-part") == part
    refunded_events = [d for d in paypal_fake.app.webhooks.snapshot() if d["event_type"] == "PAYMENT.CAPTURE.REFUNDED"]
    assert len(refunded_events) == 1
    gateway.refund(captured, 699, "USD", "refund-rest")
    second = endpoint.wait_for("PAYMENT.CAPTURE.REFUNDED", 2)[1]
    event = gateway.parse_webhook(second.body, second.headers)
    assert (event.amount, event.capture_id) == (699, captured.capture_id)
    assert second.event["resource"]["seller_payable_breakdown"]["total_refunded_amount"]["value"] == "10.99"
    assert paypal_fake.app.captures[captured.capture_id]["status"] == "REFUNDED"


def test_the_paypal_dashboard_page_refunds_by_order_or_capture_id_and_the_webhook_goes_out(
    paypal_fake: Any, paypal_gateway: Callable[..., PayPalGateway], endpoint: Endpoint
) -> None:
    gateway = paypal_gateway()
    captured = paypal_captured(paypal_fake, gateway)
    by_order = f"{paypal_fake.url}/_fake/refund/{captured.provider_payment_id}"
    form = httpx.get(by_order)
    assert form.status_code == 200 and form.headers["content-type"].startswith("text/html")
    assert '<form method="post">' in form.text and 'name="amount" value="10.99"' in form.text

    done = httpx.post(by_order, data={"amount": "2.50"})
    assert done.status_code == 200, done.text
    answer = done.json()
    assert (answer["refund"]["amount"]["value"], answer["capture_id"], answer["order_id"]) == (
        "2.50",
        captured.capture_id,
        captured.provider_payment_id,
    )
    assert (answer["capture_status"], answer["total_refunded"]["value"], answer["remaining"]["value"]) == (
        "PARTIALLY_REFUNDED",
        "2.50",
        "8.49",
    )
    [first] = endpoint.wait_for("PAYMENT.CAPTURE.REFUNDED", 1)
    event = gateway.parse_webhook(first.body, first.headers)
    assert (event.kind, event.capture_id, event.amount) == (WebhookKind.REFUNDED, captured.capture_id, 250)

    by_capture = f"{paypal_fake.url}/_fake/refund/{captured.capture_id}"
    assert 'value="8.49"' in httpx.get(by_capture).text
    rest = httpx.post(by_capture, data={})  # no amount: the rest
    assert rest.status_code == 200 and rest.json()["refund"]["amount"]["value"] == "8.49"
    assert rest.json()["capture_status"] == "REFUNDED"
    assert gateway.parse_webhook(*_parts(endpoint.wait_for("PAYMENT.CAPTURE.REFUNDED", 2)[1])).amount == 849

    again = httpx.post(by_capture, data={"amount": "1.00"})
    assert again.status_code == 422 and again.json()["details"][0]["issue"] == "CAPTURE_FULLY_REFUNDED"
    assert httpx.get(f"{paypal_fake.url}/_fake/refund/NOSUCHID").status_code == 404
    uncaptured = gateway.start(PaymentRequest("order-open", 500, "USD", "pay-open", return_url="https://x.example/"))
    assert httpx.post(f"{paypal_fake.url}/_fake/refund/{uncaptured.provider_payment_id}").status_code == 422
    # the order lists the dashboard's refunds (GET /v2/checkout/orders/{id})
    order = httpx.get(
        f"{paypal_fake.url}/v2/checkout/orders/{captured.provider_payment_id}",
        headers={"Authorization": f"Bearer {next(iter(paypal_fake.app.tokens))}"},
    ).json()
    listed = order["purchase_units"][0]["payments"]["refunds"]
    assert [(r["amount"]["value"], r["status"]) for r in listed] == [("2.50", "COMPLETED"), ("8.49", "COMPLETED")]
    assert order["purchase_units"][0]["payments"]["captures"][0]["status"] == "REFUNDED"
    assert gateway.lookup(captured.provider_payment_id).refunded == 1099


def test_paypal_amounts_the_currency_does_not_take_are_refused(
    paypal_fake: Any, paypal_gateway: Callable[..., PayPalGateway], endpoint: Endpoint
) -> None:
    gateway = paypal_gateway()
    captured = paypal_captured(paypal_fake, gateway, amount=1500, currency="JPY")
    page = f"{paypal_fake.url}/_fake/refund/{captured.capture_id}"
    assert 'value="1500"' in httpx.get(page).text
    refused = httpx.post(page, data={"amount": "1.5"})
    assert refused.status_code == 422 and refused.json()["details"][0]["issue"] == "DECIMALS_NOT_SUPPORTED"
    assert httpx.post(page, data={"amount": "five"}).status_code == 400
    assert httpx.post(page, data={"amount": "500"}).json()["refund"]["amount"] == {
        "currency_code": "JPY",
        "value": "500",
    }
    event = gateway.parse_webhook(*_parts(endpoint.wait_for("PAYMENT.CAPTURE.REFUNDED", 1)[0]))
    assert (event.amount, event.currency) == (500, "JPY")  # yen have no minor unit
    assert len(endpoint.of_type("PAYMENT.CAPTURE.REFUNDED")) == 1  # the refused ones sent nothing


def test_paypal_lookup_reports_the_refunds_the_order_lists(
    paypal_fake: Any, paypal_gateway: Callable[..., PayPalGateway]
) -> None:
    gateway = paypal_gateway()
    captured = paypal_captured(paypal_fake, gateway, "order-facts")
    order_id = captured.provider_payment_id
    untouched = PaymentFacts(
        provider_payment_id=order_id,
        taken=True,
        order_id="order-facts",
        amount=1099,
        currency="USD",
        status="COMPLETED",
        capture_id=captured.capture_id,
    )
    assert gateway.lookup(order_id) == untouched
    first = gateway.refund(captured, 100, "USD", "r1").refund_id
    assert gateway.lookup(order_id) == PaymentFacts(
        **{**untouched.__dict__, "status": "PARTIALLY_REFUNDED", "refunded": 100, "refund_ids": (first,)}
    )
    second = gateway.refund(captured, 200, "USD", "r2").refund_id
    third = gateway.refund(captured, 799, "USD", "r3").refund_id
    # a fully refunded capture was still taken
    assert gateway.lookup(order_id) == PaymentFacts(
        **{**untouched.__dict__, "status": "REFUNDED", "refunded": 1099, "refund_ids": (first, second, third)}
    )
    # read from the order (GET /v2/checkout/orders/{id}): a failed refund gave nothing back, a pending one counts
    listed = paypal_fake.app.orders[order_id]["purchase_units"][0]["payments"]["refunds"]
    assert [r["id"] for r in listed] == [first, second, third]
    listed[1]["status"], listed[2]["status"] = "FAILED", "PENDING"
    facts = gateway.lookup(order_id)
    assert (facts.refunded, facts.refund_ids) == (899, (first, third))
    # oldest first by create_time, whatever the order of the listing
    listed[0]["create_time"], listed[2]["create_time"] = "2030-01-01T00:00:00Z", "2020-01-01T00:00:00Z"
    assert gateway.lookup(order_id).refund_ids == (third, first)


def test_paypal_lookup_of_the_refunds_maps_errors_like_the_other_calls(
    paypal_fake: Any, paypal_gateway: Callable[..., PayPalGateway]
) -> None:
    gateway = paypal_gateway(max_network_retries=0)
    captured = paypal_captured(paypal_fake, gateway)
    gateway.refund(captured, 100, "USD", "r1")
    httpx.post(paypal_fake.url + "/_fake/faults", json={"count": 1, "status": 503, "path": "/v2/checkout/orders"})
    with pytest.raises(TransientPaymentError):
        gateway.lookup(captured.provider_payment_id)
    assert gateway.lookup(captured.provider_payment_id).refunded == 100
