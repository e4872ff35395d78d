"""Webhook verification and translation on the providers' public sample payloads."""

from __future__ import annotations

import copy
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the fakes live in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from handlers.payments.base import MalformedWebhook, TransientPaymentError, WebhookKind, WebhookVerificationError  # noqa: E402
from handlers.payments.paypal_gateway import PayPalGateway  # noqa: E402
from handlers.payments.settings import GatewayConfigError, PayPalSettings, StripeSettings  # noqa: E402
from handlers.payments.stripe_gateway import StripeGateway  # noqa: E402
from handlers.payments.webhooks import (  # noqa: E402
    confirmation_message_id,
    parse_webhook,
    to_command,
    to_payment_confirmed,
)
from scripts.fakes import fake_paypal, paypal_certs  # noqa: E402
from scripts.fakes.common import tls_context  # noqa: E402
from tests.support import HoldingServer  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
STRIPE_SECRET = "whsec_test_secret"
VECTOR = json.loads((FIXTURES / "paypal" / "webhook-signed-vector.json").read_text())
CERT_NAME = VECTOR["cert_url"].rsplit("/", 1)[-1]


# -- Stripe -------------------------------------------------------------------
@pytest.fixture
def stripe_gateway() -> StripeGateway:
    return StripeGateway(
        StripeSettings(
            api_key="sk_test_x",
            webhook_secret=STRIPE_SECRET,
            api_base="http://127.0.0.1:9",
            webhook_tolerance_seconds=300,
        )
    )


def stripe_event(event_type: str = "payment_intent.succeeded", **intent_changes: Any) -> str:
    """event.json's envelope around payment_intent.json, as Stripe would send it."""
    event = json.loads((FIXTURES / "stripe" / "event.json").read_text())
    intent = json.loads((FIXTURES / "stripe" / "payment_intent.json").read_text())
    intent["metadata"] = {"order_id": "7d0c9a8e-0000-4000-8000-000000000001"}
    intent.update(intent_changes)
    event.update(type=event_type, data={"object": intent})
    return json.dumps(event)


def signed(payload: str, secret: str = STRIPE_SECRET, timestamp: int | None = None) -> dict[str, str]:
    return {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)}


def test_stripe_succeeded_becomes_payment_confirmed(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event(status="succeeded")
    event = parse_webhook({"stripe": stripe_gateway}, payload.encode(), signed(payload))
    assert event.kind is WebhookKind.CONFIRMED
    # amount_received is 0 in the sample, so the intent amount counts.
    assert to_payment_confirmed(event) == {
        "order_id": "7d0c9a8e-0000-4000-8000-000000000001",
        "provider": "stripe",
        "payment_id": "pi_1PgafyB7WZ01zgkWSjxsAJo3",
        "amount": 1099,
        "currency": "USD",
        "event_id": "evt_1Pgc76B7WZ01zgkWwyRHS12y",
    }
    assert confirmation_message_id(event) == "evt_1Pgc76B7WZ01zgkWwyRHS12y"


def test_stripe_amount_received_wins(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event(amount_received=1000)
    assert stripe_gateway.parse_webhook(payload.encode(), signed(payload)).amount == 1000


def test_stripe_payment_failed(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event(
        "payment_intent.payment_failed",
        last_payment_error={"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"},
    )
    event = stripe_gateway.parse_webhook(payload.encode(), {"stripe-signature": signed(payload)["Stripe-Signature"]})
    assert (event.kind, event.reason, event.order_id) == (
        WebhookKind.FAILED,
        "insufficient_funds",
        "7d0c9a8e-0000-4000-8000-000000000001",
    )
    with pytest.raises(ValueError):
        to_payment_confirmed(event)


def test_stripe_other_events_are_ignored(stripe_gateway: StripeGateway) -> None:
    payload = (FIXTURES / "stripe" / "event.json").read_text()
    event = stripe_gateway.parse_webhook(payload.encode(), signed(payload))
    assert (event.kind, event.event_type) == (WebhookKind.IGNORED, "plan.created")


def test_stripe_tampered_body_rejected(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event()
    headers = signed(payload)
    with pytest.raises(WebhookVerificationError):
        stripe_gateway.parse_webhook(payload.replace("1099", "1", 1).encode(), headers)


def test_stripe_stale_timestamp_rejected(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event()
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        stripe_gateway.parse_webhook(payload.encode(), signed(payload, timestamp=int(time.time()) - 301))


def test_stripe_timestamp_in_the_future_beyond_the_tolerance_rejected(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event()
    with pytest.raises(WebhookVerificationError, match="future"):
        stripe_gateway.parse_webhook(payload.encode(), signed(payload, timestamp=int(time.time()) + 301))
    # inside the tolerance a clock a little ahead is fine
    assert (
        stripe_gateway.parse_webhook(payload.encode(), signed(payload, timestamp=int(time.time()) + 200)).kind
        is WebhookKind.CONFIRMED
    )


def _stripe_shaped(change: Callable[[dict[str, Any]], None]) -> str:
    event = json.loads(stripe_event())
    change(event)
    return json.dumps(event)


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e["data"].update(object="pi_123"),
        lambda e: e["data"]["object"].update(metadata=["order_id"]),
        lambda e: e["data"]["object"].update(metadata={"order_id": 7}),
        lambda e: e["data"]["object"].update(amount="1099"),
        lambda e: e["data"]["object"].update(id={"id": "pi_1"}),
        lambda e: e.update(type=["payment_intent.succeeded"]),
        lambda e: e.update(data="x"),
        lambda e: e.update(id="evt_" + "x" * 296),  # 300 characters: longer than an AMQP message id may be here
        lambda e: e.update(id=12345),
        lambda e: e.pop("id"),
    ],
    ids=[
        "object-string",
        "metadata-list",
        "order-id-number",
        "amount-string",
        "id-object",
        "type-list",
        "data-string",
        "id-300-chars",
        "id-number",
        "no-id",
    ],
)
def test_stripe_signed_but_oddly_shaped_events_are_malformed(stripe_gateway: StripeGateway, change: Any) -> None:
    payload = _stripe_shaped(change)
    with pytest.raises(MalformedWebhook):
        stripe_gateway.parse_webhook(payload.encode(), signed(payload))


@pytest.mark.parametrize(
    "event_type, changes",
    [
        ("payment_intent.succeeded", {"amount": -5}),
        ("payment_intent.succeeded", {"amount": 1099, "amount_received": -5}),
        ("payment_intent.succeeded", {"metadata": {"order_id": "not-a-uuid"}}),
        ("payment_intent.succeeded", {"metadata": {"order_id": "7d0c9a8e-0000-4000-8000-00000000000\u0000"}}),
        ("payment_intent.succeeded", {"currency": "us\u0000"}),
        ("payment_intent.succeeded", {"currency": "usdx"}),
        ("payment_intent.succeeded", {"id": "pi_\u0000"}),
        ("payment_intent.payment_failed", {"metadata": {"order_id": "not-a-uuid"}}),
    ],
    ids=["amount-negative", "received-negative", "order-not-uuid", "order-nul", "currency-nul", "currency-4", "id-nul", "failed-order-not-uuid"],
)  # fmt: skip
def test_a_signed_stripe_event_whose_command_would_be_invalid_is_malformed(
    stripe_gateway: StripeGateway, event_type: str, changes: dict[str, Any]
) -> None:
    """Before: 200 enqueued, then dead-lettered by the worker.  Now refused before anything is published."""
    payload = stripe_event(event_type, **changes)
    event = parse_webhook({"stripe": stripe_gateway}, payload.encode(), signed(payload))  # verified and read
    with pytest.raises(MalformedWebhook, match="invalid"):
        to_command(event)


def test_stripe_event_id_of_200_characters_is_fine(stripe_gateway: StripeGateway) -> None:
    payload = _stripe_shaped(lambda e: e.update(id="evt_" + "x" * 196))
    assert len(stripe_gateway.parse_webhook(payload.encode(), signed(payload)).event_id) == 200


def test_stripe_wrong_secret_rejected(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event()
    with pytest.raises(WebhookVerificationError):
        stripe_gateway.parse_webhook(payload.encode(), signed(payload, secret="whsec_other"))


# -- PayPal -------------------------------------------------------------------
# The gateway fetches PAYPAL-CERT-URL over https from allow-listed hosts only, and accepts a certificate
# only when it chains to cert_ca_file.  Here: the fake PayPal, also listening over https with a TLS
# certificate from a test CA; cert_ca_file holds that CA (for the https host and our own signing
# certificates) and DigiCert's root (for the recorded vector's real PayPal certificate).
VECTOR_TIME = datetime.fromisoformat(VECTOR["transmission_time"].replace("Z", "+00:00"))
DIGICERT_CHAIN = (ROOT / "tests" / "fixtures" / "paypal-vector-digicert-chain.pem").read_text()
DIGICERT_INTERMEDIATE = DIGICERT_CHAIN[
    DIGICERT_CHAIN.index("-----BEGIN") : DIGICERT_CHAIN.index("-----END CERTIFICATE-----") + 25
]
#: the vector's signing certificate as PayPal's URL serves it: with its issuer
VECTOR_CHAIN = VECTOR["cert_pem"].strip() + "\n" + DIGICERT_INTERMEDIATE + "\n"


@pytest.fixture(scope="module")
def authority() -> paypal_certs.TestAuthority:
    return paypal_certs.TestAuthority()


@pytest.fixture(scope="module")
def server(authority: paypal_certs.TestAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    srv = fake_paypal.serve(0)
    srv.app.certs[CERT_NAME] = VECTOR_CHAIN
    cert, key = paypal_certs.write_tls(authority.tls_cert(), tmp_path_factory.mktemp("paypal-tls"))
    secure = fake_paypal.serve(0, tls=tls_context(str(cert), str(key)), app=srv.app)
    srv.cert_base = f"{secure.url}/_fake/certs"  # type: ignore[attr-defined]
    srv.cert_origin = secure.url.removeprefix("https://")  # type: ignore[attr-defined]  # 127.0.0.1:<port>
    yield srv
    secure.stop()
    srv.stop()


@pytest.fixture(scope="module")
def ca_file(authority: paypal_certs.TestAuthority, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("paypal-ca") / "roots.pem"
    path.write_bytes(
        authority.ca_pem + DIGICERT_CHAIN[DIGICERT_CHAIN.index("-----END CERTIFICATE-----") + 25 :].encode()
    )
    return str(path)


@pytest.fixture
def make_paypal(server: Any, ca_file: str) -> Callable[..., PayPalGateway]:
    def make(at: datetime | None = None, ticker: Callable[[], float] | None = None, **overrides: Any) -> PayPalGateway:
        values: dict[str, Any] = {
            "client_id": fake_paypal.DEFAULT_CLIENT_ID,
            "client_secret": fake_paypal.DEFAULT_CLIENT_SECRET,
            "base_url": server.url,
            "webhook_id": VECTOR["webhook_id"],
            "cert_host_allowlist": (server.cert_origin,),  # the fake's https port (PayPal's is 443)
            "cert_ca_file": ca_file,
            **overrides,
        }
        times: dict[str, Any] = {"clock": lambda: at} if at else {}
        return PayPalGateway(PayPalSettings(**values), **times, **({"ticker": ticker} if ticker else {}))

    return make


def vector_headers(cert_url: str) -> dict[str, str]:
    return {
        "PAYPAL-TRANSMISSION-ID": VECTOR["transmission_id"],
        "PAYPAL-TRANSMISSION-TIME": VECTOR["transmission_time"],
        "PAYPAL-TRANSMISSION-SIG": VECTOR["transmission_sig"],
        "PAYPAL-AUTH-ALGO": VECTOR["auth_algo"],
        "PAYPAL-CERT-URL": cert_url,
    }


def test_paypal_real_vector_verifies_through_digicert_at_its_own_time(
    server: Any, make_paypal: Callable[..., PayPalGateway]
) -> None:
    event = parse_webhook(
        {"paypal": make_paypal(at=VECTOR_TIME)},
        VECTOR["body"].encode(),
        vector_headers(f"{server.cert_base}/{CERT_NAME}"),
    )
    assert (event.kind, event.provider) == (WebhookKind.IGNORED, "paypal")  # a v1 sale event: verified, not ours
    assert (event.event_id, event.event_type) == ("WH-0G2756385H040842W-5Y612302CV158622M", "PAYMENT.SALE.COMPLETED")


def test_paypal_real_vector_is_refused_today_its_certificate_has_expired(
    server: Any, make_paypal: Callable[..., PayPalGateway]
) -> None:
    with pytest.raises(WebhookVerificationError, match="not valid"):
        make_paypal().parse_webhook(VECTOR["body"].encode(), vector_headers(f"{server.cert_base}/{CERT_NAME}"))


def test_paypal_real_vector_without_its_intermediate_does_not_chain(
    server: Any, make_paypal: Callable[..., PayPalGateway]
) -> None:
    server.app.certs["CERT-vector-alone"] = VECTOR["cert_pem"]
    with pytest.raises(WebhookVerificationError, match="does not verify"):
        make_paypal(at=VECTOR_TIME).parse_webhook(
            VECTOR["body"].encode(), vector_headers(f"{server.cert_base}/CERT-vector-alone")
        )


def test_paypal_one_flipped_byte_fails(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    body = bytearray(VECTOR["body"].encode())
    body[body.index(b"20.00")] ^= 0x01  # "20.00" → "30.00"
    with pytest.raises(WebhookVerificationError, match="signature"):
        make_paypal(at=VECTOR_TIME).parse_webhook(bytes(body), vector_headers(f"{server.cert_base}/{CERT_NAME}"))


def test_paypal_other_webhook_id_fails(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    with pytest.raises(WebhookVerificationError, match="signature"):
        make_paypal(at=VECTOR_TIME, webhook_id="SOMEONE-ELSES").parse_webhook(
            VECTOR["body"].encode(), vector_headers(f"{server.cert_base}/{CERT_NAME}")
        )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/_fake/certs/" + CERT_NAME,  # allowed host, plain http (even on loopback)
        "https://localhost:{port}/_fake/certs/" + CERT_NAME,  # loopback, but not on the allow-list
        "https://127.0.0.2:{port}/_fake/certs/" + CERT_NAME,
        "https://127.0.0.1:{port}/_fake/certs/" + CERT_NAME,  # allowed host, but not on port 443
        "https://api.sandbox.paypal.com:{port}/v1/notifications/certs/" + CERT_NAME,  # PayPal's host, another port
        "https://user@127.0.0.1:{port}/_fake/certs/" + CERT_NAME,
        "ftp://127.0.0.1:{port}/_fake/certs/" + CERT_NAME,
        "https://evil.example.com/v1/notifications/certs/" + CERT_NAME,
        "http://api.sandbox.paypal.com/v1/notifications/certs/" + CERT_NAME,  # allowed host, plain http
    ],
)
def test_paypal_cert_url_not_allowed_is_refused_without_a_connection(
    make_paypal: Callable[..., PayPalGateway], url: str
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # what a probed port would be
    listener.setblocking(False)
    try:
        gateway = make_paypal(at=VECTOR_TIME, cert_host_allowlist=("127.0.0.1", "api.sandbox.paypal.com"))
        with pytest.raises(WebhookVerificationError, match="certificate URL"):
            gateway.parse_webhook(VECTOR["body"].encode(), vector_headers(url.format(port=listener.getsockname()[1])))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def _cert_fetches(server: Any, name: str) -> int:
    return int(httpx.get(server.url + "/_fake/charges").json()["cert_fetches"].get(name, 0))


def test_paypal_missing_cert_is_rejected_and_not_fetched_again_for_a_minute(
    server: Any, make_paypal: Callable[..., PayPalGateway]
) -> None:
    now = [100.0]
    gateway = make_paypal(ticker=lambda: now[0])
    headers = vector_headers(f"{server.cert_base}/CERT-unknown")
    before = _cert_fetches(server, "CERT-unknown")
    for _ in range(3):
        with pytest.raises(WebhookVerificationError, match="http 404"):
            gateway.parse_webhook(VECTOR["body"].encode(), headers)
    assert _cert_fetches(server, "CERT-unknown") == before + 1  # the failure is remembered
    now[0] += 61  # past its 60 s
    with pytest.raises(WebhookVerificationError, match="http 404"):
        gateway.parse_webhook(VECTOR["body"].encode(), headers)
    assert _cert_fetches(server, "CERT-unknown") == before + 2


def test_paypal_unreachable_cert_host_is_transient(make_paypal: Callable[..., PayPalGateway]) -> None:
    with pytest.raises(TransientPaymentError):
        make_paypal(cert_host_allowlist=("127.0.0.1:9",)).parse_webhook(
            VECTOR["body"].encode(), vector_headers(f"https://127.0.0.1:9/certs/{CERT_NAME}")
        )


@pytest.fixture
def holding() -> Iterator[HoldingServer]:
    server = HoldingServer()
    yield server
    server.stop()


def test_a_cert_host_that_holds_connections_is_tried_once_then_remembered_for_every_path(
    make_paypal: Callable[..., PayPalGateway], holding: HoldingServer
) -> None:
    now = [100.0]
    gateway = make_paypal(
        ticker=lambda: now[0], cert_host_allowlist=(f"127.0.0.1:{holding.port}",), timeout_seconds=0.5
    )
    started = time.monotonic()
    with pytest.raises(TransientPaymentError):
        gateway.parse_webhook(VECTOR["body"].encode(), vector_headers(f"https://127.0.0.1:{holding.port}/a"))
    assert 0.4 < time.monotonic() - started < 3  # the fetch's timeout
    started = time.monotonic()
    for path in ("a", "b", "c"):  # any path there: the host did not answer, so nothing is tried for a minute
        with pytest.raises(TransientPaymentError):
            gateway.parse_webhook(VECTOR["body"].encode(), vector_headers(f"https://127.0.0.1:{holding.port}/{path}"))
    assert time.monotonic() - started < 0.2
    assert holding.accepted == 1
    now[0] += 61
    with pytest.raises(TransientPaymentError):
        gateway.parse_webhook(VECTOR["body"].encode(), vector_headers(f"https://127.0.0.1:{holding.port}/d"))
    assert holding.accepted == 2


def test_at_most_four_certificate_fetches_are_in_flight_and_the_rest_are_refused_at_once(
    make_paypal: Callable[..., PayPalGateway], holding: HoldingServer
) -> None:
    gateway = make_paypal(cert_host_allowlist=(f"127.0.0.1:{holding.port}",), timeout_seconds=2)
    start = threading.Barrier(10)
    outcomes: list[tuple[str, float]] = []

    def fetch(i: int) -> None:
        start.wait()
        began = time.monotonic()
        try:
            gateway.parse_webhook(VECTOR["body"].encode(), vector_headers(f"https://127.0.0.1:{holding.port}/{i}"))
        except Exception as exc:  # noqa: BLE001 - the kind is what is asserted
            outcomes.append((type(exc).__name__, time.monotonic() - began))

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    busy = [took for kind, took in outcomes if kind == "CertificateFetchBusy"]
    waited = [took for kind, took in outcomes if kind == "TransientPaymentError"]
    assert (len(busy), len(waited)) == (6, 4), outcomes
    assert max(busy) < 0.5 and min(waited) > 1.5  # the busy ones did not wait for a slot
    assert holding.accepted == 4


def test_a_cert_host_whose_tls_certificate_is_not_trusted_is_refused(
    server: Any, make_paypal: Callable[..., PayPalGateway], tmp_path: Path
) -> None:
    other = paypal_certs.TestAuthority("Someone Else's CA")
    with pytest.raises(WebhookVerificationError, match="TLS"):
        make_paypal(at=VECTOR_TIME, cert_ca_file=str(other.write_ca(tmp_path / "other.pem"))).parse_webhook(
            VECTOR["body"].encode(), vector_headers(f"{server.cert_base}/{CERT_NAME}")
        )


def test_an_unreadable_cert_ca_file_stops_start_up(make_paypal: Callable[..., PayPalGateway], tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="paypal.cert_ca_file"):
        make_paypal(cert_ca_file=str(tmp_path / "missing.pem"))
    (tmp_path / "empty.pem").write_text("no certificate here\n")
    with pytest.raises(GatewayConfigError, match="paypal.cert_ca_file"):
        make_paypal(cert_ca_file=str(tmp_path / "empty.pem"))


def test_paypal_postback_verification(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    server.app.certs["CERT-vector-alone"] = VECTOR["cert_pem"]  # the fake checks the signature with it
    gateway = make_paypal(verification="postback", cert_ca_file="/nonexistent")  # postback never reads it
    headers = vector_headers(f"{server.url}/_fake/certs/CERT-vector-alone")
    assert gateway.parse_webhook(VECTOR["body"].encode(), headers).event_type == "PAYMENT.SALE.COMPLETED"
    with pytest.raises(WebhookVerificationError, match="postback"):
        gateway.parse_webhook(VECTOR["body"].replace("20.00", "30.00", 1).encode(), headers)


# Our own signing certificates, to sign the events this service acts on.
@pytest.fixture(scope="module")
def signer(server: Any, authority: paypal_certs.TestAuthority) -> Callable[..., tuple[bytes, dict[str, str]]]:
    now = datetime.now(UTC)
    certs = {
        "CERT-good": authority.signing_cert(),
        "CERT-other": authority.signing_cert("shop.example.com"),
        "CERT-expired": authority.signing_cert(not_before=now - timedelta(days=3), not_after=now - timedelta(days=1)),
        "CERT-forged": paypal_certs.self_signed(),  # PayPal's name, served by an allowed host, chains to nothing
    }
    for name, issued in certs.items():
        server.app.certs[name] = issued.cert_pem.decode()

    def sign(
        event: dict[str, Any], cert_name: str = "CERT-good", webhook_id: str = "OUR-WEBHOOK"
    ) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(event).encode()
        return body, paypal_certs.paypal_headers(certs[cert_name], body, webhook_id, f"{server.cert_base}/{cert_name}")

    return sign


CAPTURE_COMPLETED = {
    "id": "WH-58D329510W468432D-8HN650336L201105X",
    "event_type": "PAYMENT.CAPTURE.COMPLETED",
    "resource_type": "capture",
    "resource": {
        "id": "42311647XV020574X",
        "status": "COMPLETED",
        "amount": {"currency_code": "JPY", "value": "1500"},
        "custom_id": "7d0c9a8e-0000-4000-8000-000000000002",
        "final_capture": True,
        "supplementary_data": {"related_ids": {"order_id": "5O190127TN364715T"}},
    },
}


def test_paypal_capture_completed_becomes_payment_confirmed(
    make_paypal: Callable[..., PayPalGateway], signer: Any
) -> None:
    body, headers = signer(CAPTURE_COMPLETED)
    gateway = make_paypal(webhook_id="OUR-WEBHOOK")  # our cert chains to the configured CA and is valid now
    event = parse_webhook({"paypal": gateway}, body, headers)
    assert to_payment_confirmed(event) == {
        "order_id": "7d0c9a8e-0000-4000-8000-000000000002",
        "provider": "paypal",
        "payment_id": "5O190127TN364715T",
        "amount": 1500,
        "currency": "JPY",
        "event_id": "WH-58D329510W468432D-8HN650336L201105X",
    }


def test_a_forged_self_signed_paypal_certificate_is_refused(
    make_paypal: Callable[..., PayPalGateway], signer: Any
) -> None:
    with pytest.raises(WebhookVerificationError, match="does not verify"):
        make_paypal(webhook_id="OUR-WEBHOOK").parse_webhook(*signer(CAPTURE_COMPLETED, cert_name="CERT-forged"))


def test_an_expired_paypal_signing_certificate_is_refused(
    make_paypal: Callable[..., PayPalGateway], signer: Any
) -> None:
    with pytest.raises(WebhookVerificationError, match="not valid"):
        make_paypal(webhook_id="OUR-WEBHOOK").parse_webhook(*signer(CAPTURE_COMPLETED, cert_name="CERT-expired"))


def test_paypal_capture_denied_and_order_approved(make_paypal: Callable[..., PayPalGateway], signer: Any) -> None:
    gateway = make_paypal(webhook_id="OUR-WEBHOOK")
    denied = copy.deepcopy(CAPTURE_COMPLETED)
    denied.update(id="WH-DENIED", event_type="PAYMENT.CAPTURE.DENIED")
    denied["resource"]["status"] = "DECLINED"
    event = gateway.parse_webhook(*signer(denied))
    assert (event.kind, event.reason) == (WebhookKind.FAILED, "DECLINED")
    approved = {
        "id": "WH-APPROVED",
        "event_type": "CHECKOUT.ORDER.APPROVED",
        "resource": {
            "id": "5O190127TN364715T",
            "status": "APPROVED",
            "purchase_units": [
                {
                    "custom_id": "7d0c9a8e-0000-4000-8000-000000000002",
                    "amount": {"currency_code": "USD", "value": "10.99"},
                }
            ],
        },
    }
    event = gateway.parse_webhook(*signer(approved))
    assert (event.kind, event.provider_payment_id, event.order_id, event.amount) == (
        WebhookKind.APPROVED,
        "5O190127TN364715T",
        "7d0c9a8e-0000-4000-8000-000000000002",
        1099,
    )


@pytest.mark.parametrize(
    "event",
    [
        {**CAPTURE_COMPLETED, "resource": "42311647XV020574X"},
        {**CAPTURE_COMPLETED, "resource": {**CAPTURE_COMPLETED["resource"], "amount": "1500 JPY"}},
        {
            **CAPTURE_COMPLETED,
            "resource": {**CAPTURE_COMPLETED["resource"], "amount": {"currency_code": "JPY", "value": 1500}},
        },
        {
            **CAPTURE_COMPLETED,
            "resource": {**CAPTURE_COMPLETED["resource"], "amount": {"currency_code": "JPY", "value": "15.5"}},
        },
        {
            **CAPTURE_COMPLETED,
            "resource": {**CAPTURE_COMPLETED["resource"], "supplementary_data": {"related_ids": ["x"]}},
        },
        {**CAPTURE_COMPLETED, "resource": {**CAPTURE_COMPLETED["resource"], "custom_id": ["7d0c9a8e"]}},
        {**CAPTURE_COMPLETED, "id": "WH-" + "X" * 297},
        {**CAPTURE_COMPLETED, "event_type": None},
        {
            "id": "WH-APPROVED",
            "event_type": "CHECKOUT.ORDER.APPROVED",
            "resource": {"id": "5O1", "purchase_units": "none"},
        },
        {
            "id": "WH-APPROVED",
            "event_type": "CHECKOUT.ORDER.APPROVED",
            "resource": {"id": "5O1", "purchase_units": ["unit"]},
        },
        ["not", "an", "event"],
    ],
    ids=[
        "resource-string",
        "amount-string",
        "value-number",
        "value-fraction-of-yen",
        "related-ids-list",
        "custom-id-list",
        "id-300-chars",
        "event-type-null",
        "units-string",
        "unit-string",
        "list",
    ],
)
def test_paypal_signed_but_oddly_shaped_events_are_malformed(
    make_paypal: Callable[..., PayPalGateway], signer: Any, event: Any
) -> None:
    with pytest.raises(MalformedWebhook):
        make_paypal(webhook_id="OUR-WEBHOOK").parse_webhook(*signer(event))


@pytest.mark.parametrize(
    "event",
    [
        {**CAPTURE_COMPLETED, "resource": {**CAPTURE_COMPLETED["resource"], "custom_id": "not-a-uuid"}},
        {
            **CAPTURE_COMPLETED,
            "resource": {**CAPTURE_COMPLETED["resource"], "amount": {"currency_code": "J\u0000Y", "value": "1500"}},
        },
        {
            **CAPTURE_COMPLETED,
            "resource": {
                **CAPTURE_COMPLETED["resource"],
                "supplementary_data": {"related_ids": {"order_id": "5O19\u00000127"}},
            },
        },
        {
            "id": "WH-APPROVED-BAD",
            "event_type": "CHECKOUT.ORDER.APPROVED",
            "resource": {"id": "5O190127TN364715T", "purchase_units": [{"custom_id": "order-7"}]},
        },
        {
            **CAPTURE_COMPLETED,
            "id": "WH-DENIED-BAD",
            "event_type": "PAYMENT.CAPTURE.DENIED",
            "resource": {**CAPTURE_COMPLETED["resource"], "custom_id": "not-a-uuid"},
        },
    ],
    ids=["custom-id-not-uuid", "currency-nul", "payment-id-nul", "approved-order-not-uuid", "denied-order-not-uuid"],
)
def test_a_signed_paypal_event_whose_command_would_be_invalid_is_malformed(
    make_paypal: Callable[..., PayPalGateway], signer: Any, event: Any
) -> None:
    verified = make_paypal(webhook_id="OUR-WEBHOOK").parse_webhook(*signer(event))
    with pytest.raises(MalformedWebhook, match="invalid"):
        to_command(verified)


def test_a_failure_reason_loses_its_control_characters_rather_than_the_event(
    make_paypal: Callable[..., PayPalGateway], signer: Any
) -> None:
    denied = copy.deepcopy(CAPTURE_COMPLETED)
    denied.update(id="WH-DENIED-NL", event_type="PAYMENT.CAPTURE.DENIED")
    denied["resource"]["status_details"] = {"reason": "DECLINED\nBY\tBANK"}
    command = to_command(make_paypal(webhook_id="OUR-WEBHOOK").parse_webhook(*signer(denied)))
    assert command is not None and command.body["reason"] == "DECLINED BY BANK"


def test_paypal_cert_for_another_name_is_rejected(make_paypal: Callable[..., PayPalGateway], signer: Any) -> None:
    with pytest.raises(WebhookVerificationError, match="not PayPal"):
        make_paypal(webhook_id="OUR-WEBHOOK").parse_webhook(*signer(CAPTURE_COMPLETED, cert_name="CERT-other"))


# -- routing ------------------------------------------------------------------
def test_unsigned_or_doubly_signed_webhooks_are_rejected(stripe_gateway: StripeGateway) -> None:
    gateways = {"stripe": stripe_gateway}
    with pytest.raises(WebhookVerificationError):
        parse_webhook(gateways, b"{}", {"Content-Type": "application/json"})
    with pytest.raises(WebhookVerificationError):
        parse_webhook(gateways, b"{}", {"Stripe-Signature": "t=1,v1=00", "Paypal-Transmission-Sig": "x"})
    with pytest.raises(WebhookVerificationError, match="no gateway"):
        parse_webhook(gateways, b"{}", {"paypal-transmission-sig": "x"})


def test_cert_is_fetched_once(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    gateway = make_paypal(at=VECTOR_TIME)
    headers = vector_headers(f"{server.cert_base}/{CERT_NAME}")
    before = httpx.get(server.url + "/_fake/charges").json()["cert_fetches"].get(CERT_NAME, 0)
    for _ in range(3):
        gateway.parse_webhook(VECTOR["body"].encode(), headers)
    assert httpx.get(server.url + "/_fake/charges").json()["cert_fetches"][CERT_NAME] == before + 1


def test_build_gateways_from_the_config_file() -> None:
    from handlers.payments import build_gateways
    from worker.settings import load_settings

    gateways = build_gateways(load_settings(ROOT / "config" / "config.yaml", environ={}))
    assert {name: g.provider for name, g in gateways.items()} == {"stripe": "stripe", "paypal": "paypal"}
    assert isinstance(gateways["paypal"], PayPalGateway) and isinstance(gateways["stripe"], StripeGateway)
