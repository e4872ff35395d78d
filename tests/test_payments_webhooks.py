"""Webhook verification and translation on the providers' public sample payloads."""

from __future__ import annotations

import base64
import copy
import json
import sys
import time
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import stripe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the fakes live in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from scripts.fakes import fake_paypal  # noqa: E402

from handlers.payments.base import TransientPaymentError, WebhookKind, WebhookVerificationError  # noqa: E402
from handlers.payments.paypal_gateway import PayPalGateway  # noqa: E402
from handlers.payments.stripe_gateway import StripeGateway  # noqa: E402
from handlers.payments.webhooks import confirmation_message_id, parse_webhook, to_payment_confirmed  # noqa: E402
from worker.settings import PayPalSettings, StripeSettings  # noqa: E402

FIXTURES = Path("/work/shared/fixtures")
STRIPE_SECRET = "whsec_test_secret"
VECTOR = json.loads((FIXTURES / "paypal" / "webhook-signed-vector.json").read_text())
CERT_NAME = VECTOR["cert_url"].rsplit("/", 1)[-1]


# -- Stripe -------------------------------------------------------------------
@pytest.fixture
def stripe_gateway() -> StripeGateway:
    return StripeGateway(StripeSettings(api_key="sk_test_x", webhook_secret=STRIPE_SECRET, api_base="http://127.0.0.1:9",
                                        webhook_tolerance_seconds=300))


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
        "order_id": "7d0c9a8e-0000-4000-8000-000000000001", "provider": "stripe",
        "payment_id": "pi_1PgafyB7WZ01zgkWSjxsAJo3", "amount": 1099, "currency": "USD",
        "event_id": "evt_1Pgc76B7WZ01zgkWwyRHS12y",
    }
    assert confirmation_message_id(event) == "evt_1Pgc76B7WZ01zgkWwyRHS12y"


def test_stripe_amount_received_wins(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event(amount_received=1000)
    assert stripe_gateway.parse_webhook(payload.encode(), signed(payload)).amount == 1000


def test_stripe_payment_failed(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event("payment_intent.payment_failed",
                           last_payment_error={"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"})
    event = stripe_gateway.parse_webhook(payload.encode(), {"stripe-signature": signed(payload)["Stripe-Signature"]})
    assert (event.kind, event.reason, event.order_id) == (WebhookKind.FAILED, "insufficient_funds", "7d0c9a8e-0000-4000-8000-000000000001")
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


def test_stripe_wrong_secret_rejected(stripe_gateway: StripeGateway) -> None:
    payload = stripe_event()
    with pytest.raises(WebhookVerificationError):
        stripe_gateway.parse_webhook(payload.encode(), signed(payload, secret="whsec_other"))


# -- PayPal -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    srv = fake_paypal.serve(0)
    srv.app.certs[CERT_NAME] = VECTOR["cert_pem"]
    yield srv
    srv.stop()


@pytest.fixture
def make_paypal(server: Any) -> Callable[..., PayPalGateway]:
    def make(check_cert_expiry: bool = False, **overrides: Any) -> PayPalGateway:
        values: dict[str, Any] = {
            "client_id": fake_paypal.DEFAULT_CLIENT_ID, "client_secret": fake_paypal.DEFAULT_CLIENT_SECRET,
            "base_url": server.url, "webhook_id": VECTOR["webhook_id"], "cert_host_allowlist": ("127.0.0.1",), **overrides,
        }
        return PayPalGateway(PayPalSettings(**values), check_cert_expiry=check_cert_expiry)

    return make


def vector_headers(cert_url: str) -> dict[str, str]:
    return {
        "PAYPAL-TRANSMISSION-ID": VECTOR["transmission_id"], "PAYPAL-TRANSMISSION-TIME": VECTOR["transmission_time"],
        "PAYPAL-TRANSMISSION-SIG": VECTOR["transmission_sig"], "PAYPAL-AUTH-ALGO": VECTOR["auth_algo"],
        "PAYPAL-CERT-URL": cert_url,
    }


def test_paypal_real_vector_verifies_offline(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    event = parse_webhook({"paypal": make_paypal()}, VECTOR["body"].encode(), vector_headers(f"{server.url}/_fake/certs/{CERT_NAME}"))
    assert (event.kind, event.provider) == (WebhookKind.IGNORED, "paypal")  # a v1 sale event: verified, not ours
    assert (event.event_id, event.event_type) == ("WH-0G2756385H040842W-5Y612302CV158622M", "PAYMENT.SALE.COMPLETED")


def test_paypal_one_flipped_byte_fails(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    body = bytearray(VECTOR["body"].encode())
    body[body.index(b"20.00")] ^= 0x01  # "20.00" → "30.00"
    with pytest.raises(WebhookVerificationError, match="signature"):
        make_paypal().parse_webhook(bytes(body), vector_headers(f"{server.url}/_fake/certs/{CERT_NAME}"))


def test_paypal_other_webhook_id_fails(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    with pytest.raises(WebhookVerificationError):
        make_paypal(webhook_id="SOMEONE-ELSES").parse_webhook(VECTOR["body"].encode(), vector_headers(f"{server.url}/_fake/certs/{CERT_NAME}"))


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:{port}/_fake/certs/" + CERT_NAME,  # loopback, but not on the allow-list
        "https://evil.example.com/v1/notifications/certs/" + CERT_NAME,
        "http://api.sandbox.paypal.com/v1/notifications/certs/" + CERT_NAME,  # allowed host, plain http
        "http://user@127.0.0.1:{port}/_fake/certs/" + CERT_NAME,
    ],
)
def test_paypal_cert_url_not_allowed(server: Any, make_paypal: Callable[..., PayPalGateway], url: str) -> None:
    gateway = make_paypal(cert_host_allowlist=("127.0.0.1", "api.sandbox.paypal.com"))
    with pytest.raises(WebhookVerificationError, match="certificate URL"):
        gateway.parse_webhook(VECTOR["body"].encode(), vector_headers(url.format(port=server.server_address[1])))


def test_paypal_expired_cert_rejected_unless_told(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    with pytest.raises(WebhookVerificationError, match="not valid now"):
        make_paypal(check_cert_expiry=True).parse_webhook(VECTOR["body"].encode(), vector_headers(f"{server.url}/_fake/certs/{CERT_NAME}"))


def test_paypal_missing_cert_is_rejected(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    with pytest.raises(WebhookVerificationError, match="http 404"):
        make_paypal().parse_webhook(VECTOR["body"].encode(), vector_headers(f"{server.url}/_fake/certs/CERT-unknown"))


def test_paypal_unreachable_cert_host_is_transient(make_paypal: Callable[..., PayPalGateway]) -> None:
    with pytest.raises(TransientPaymentError):
        make_paypal().parse_webhook(VECTOR["body"].encode(), vector_headers(f"http://127.0.0.1:9/certs/{CERT_NAME}"))


def test_paypal_postback_verification(server: Any, make_paypal: Callable[..., PayPalGateway]) -> None:
    gateway = make_paypal(verification="postback")
    headers = vector_headers(f"{server.url}/_fake/certs/{CERT_NAME}")
    assert gateway.parse_webhook(VECTOR["body"].encode(), headers).event_type == "PAYMENT.SALE.COMPLETED"
    with pytest.raises(WebhookVerificationError, match="postback"):
        gateway.parse_webhook(VECTOR["body"].replace("20.00", "30.00", 1).encode(), headers)


# Our own signing certificate, to sign the events this service acts on.
@pytest.fixture(scope="module")
def signer(server: Any) -> Callable[..., tuple[bytes, dict[str, str]]]:
    def make_cert(name: str) -> tuple[rsa.RSAPrivateKey, str]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert.public_bytes(serialization.Encoding.PEM).decode()

    keys = {}
    for cert_name, subject in (("CERT-good", "messageverificationcerts.sandbox.paypal.com"), ("CERT-other", "shop.example.com")):
        keys[cert_name], server.app.certs[cert_name] = make_cert(subject)

    def sign(event: dict[str, Any], cert_name: str = "CERT-good", webhook_id: str = "OUR-WEBHOOK") -> tuple[bytes, dict[str, str]]:
        body = json.dumps(event).encode()
        tid, ttime = "b2384410-0000-11ef-0000-000000000001", "2026-01-01T00:00:00Z"
        message = f"{tid}|{ttime}|{webhook_id}|{zlib.crc32(body)}".encode()
        sig = keys[cert_name].sign(message, padding.PKCS1v15(), hashes.SHA256())
        return body, {"paypal-transmission-id": tid, "paypal-transmission-time": ttime, "paypal-auth-algo": "SHA256withRSA",
                      "paypal-transmission-sig": base64.b64encode(sig).decode(), "paypal-cert-url": f"{server.url}/_fake/certs/{cert_name}"}

    return sign


CAPTURE_COMPLETED = {
    "id": "WH-58D329510W468432D-8HN650336L201105X", "event_type": "PAYMENT.CAPTURE.COMPLETED", "resource_type": "capture",
    "resource": {
        "id": "42311647XV020574X", "status": "COMPLETED", "amount": {"currency_code": "JPY", "value": "1500"},
        "custom_id": "7d0c9a8e-0000-4000-8000-000000000002", "final_capture": True,
        "supplementary_data": {"related_ids": {"order_id": "5O190127TN364715T"}},
    },
}


def test_paypal_capture_completed_becomes_payment_confirmed(make_paypal: Callable[..., PayPalGateway], signer: Any) -> None:
    body, headers = signer(CAPTURE_COMPLETED)
    gateway = make_paypal(check_cert_expiry=True, webhook_id="OUR-WEBHOOK")  # our cert is valid now
    event = parse_webhook({"paypal": gateway}, body, headers)
    assert to_payment_confirmed(event) == {
        "order_id": "7d0c9a8e-0000-4000-8000-000000000002", "provider": "paypal", "payment_id": "5O190127TN364715T",
        "amount": 1500, "currency": "JPY", "event_id": "WH-58D329510W468432D-8HN650336L201105X",
    }


def test_paypal_capture_denied_and_order_approved(make_paypal: Callable[..., PayPalGateway], signer: Any) -> None:
    gateway = make_paypal(webhook_id="OUR-WEBHOOK")
    denied = copy.deepcopy(CAPTURE_COMPLETED)
    denied.update(id="WH-DENIED", event_type="PAYMENT.CAPTURE.DENIED")
    denied["resource"]["status"] = "DECLINED"
    event = gateway.parse_webhook(*signer(denied))
    assert (event.kind, event.reason) == (WebhookKind.FAILED, "DECLINED")
    approved = {"id": "WH-APPROVED", "event_type": "CHECKOUT.ORDER.APPROVED", "resource": {
        "id": "5O190127TN364715T", "status": "APPROVED",
        "purchase_units": [{"custom_id": "7d0c9a8e-0000-4000-8000-000000000002", "amount": {"currency_code": "USD", "value": "10.99"}}]}}
    event = gateway.parse_webhook(*signer(approved))
    assert (event.kind, event.provider_payment_id, event.order_id, event.amount) == (
        WebhookKind.APPROVED, "5O190127TN364715T", "7d0c9a8e-0000-4000-8000-000000000002", 1099)


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
    gateway = make_paypal()
    headers = vector_headers(f"{server.url}/_fake/certs/{CERT_NAME}")
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
