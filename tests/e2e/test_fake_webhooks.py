"""The fakes complete payments as the providers do: a browser following PayPal's approve link or Stripe's
3-D Secure page makes the fake deliver the provider's signed webhook to the shim, and the order completes.

A real uvicorn (``orders shim``), worker pool and relay run against real RabbitMQ, PostgreSQL and Redis;
the fakes run in this process on free ports, PayPal's also over https (its signing certificate's URL),
with a PKI from ``paypal_certs`` that the service is told to trust.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the fakes live in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from scripts.fakes import fake_paypal, fake_stripe, paypal_certs  # noqa: E402
from scripts.fakes.common import WebhookSender, tls_context  # noqa: E402
from scripts.tcp_proxy import free_port  # noqa: E402
from tests.support import wait_until  # noqa: E402

ORDERS = str(Path(sys.executable).parent / "orders")
JWT_SECRET = "fake-webhook-tests-jwt-secret-of-at-least-32-bytes"
WEBHOOK_PATH = "/orders/payment-confirmation"


class ReturnPage:
    """The shop's return page: records the query strings it was sent back with."""

    def __init__(self) -> None:
        self.visits: list[dict[str, list[str]]] = []
        visits = self.visits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                visits.append(parse_qs(urlsplit(self.path).query))
                body = b"thank you for your order"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/paid"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Stack:
    def __init__(self, env: dict[str, str], logs: Path, engine: Any, fakes: dict[str, Any]) -> None:
        self.env, self.logs, self.engine, self.fakes = env, logs, engine, fakes
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, *args: str) -> None:
        log = (self.logs / f"{args[0]}-{len(self.procs)}.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                [ORDERS, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def auth(self, user: str = "alice") -> dict[str, str]:
        now = int(time.time())
        token = jwt.encode({"sub": user, "roles": ["user"], "iat": now, "exp": now + 600}, JWT_SECRET, "HS256")
        return {"Authorization": f"Bearer {token}"}

    def place(self, payment: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(
            self.url + "/orders",
            json={"items": [{"product_id": "sku-apple", "quantity": 2}], "payment": payment},
            headers={**self.auth(), "Prefer": "wait=15"},
            timeout=40,
        )
        assert r.status_code == 201 and r.json()["status"] == "awaiting_payment", r.text
        return dict(r.json())

    def status(self, order_id: str) -> str | None:
        r = httpx.get(f"{self.url}/orders/{order_id}", headers=self.auth(), timeout=10)
        return str(r.json()["status"]) if r.status_code == 200 else None

    def deliveries(self, provider: str) -> list[dict[str, Any]]:
        return list(httpx.get(self.fakes[provider].url + "/_fake/webhooks", timeout=5).json()["deliveries"])


@pytest.fixture(scope="module")
def stack(
    test_env: dict[str, str], settings: Any, engine: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from worker import catalogue

    tmp = tmp_path_factory.mktemp("fake-webhooks")
    pki = paypal_certs.TestAuthority("Fake webhook tests PayPal Root CA")
    ca = pki.write_ca(tmp / "paypal-ca.pem")
    stripe_fake = fake_stripe.serve(0)
    paypal_fake = fake_paypal.serve(0)
    paypal_tls = fake_paypal.serve(
        0, tls=tls_context(*map(str, paypal_certs.write_tls(pki.tls_cert(), tmp))), app=paypal_fake.app
    )
    paypal_fake.app.tls_url = paypal_tls.url
    with engine.begin() as conn:
        conn.execute(
            text("TRUNCATE orders, order_items, order_transitions, order_history, payments, inbox, outbox, products")
        )
    catalogue.upsert(engine, [catalogue.ProductRow(product_id="sku-apple", name="Apple", price=150, currency="USD")])
    env = {
        **test_env,
        "ORDERS_STRIPE__API_BASE": stripe_fake.url,
        "ORDERS_STRIPE__MAX_NETWORK_RETRIES": "0",
        "ORDERS_PAYPAL__BASE_URL": paypal_fake.url,
        "ORDERS_PAYPAL__CERT_CA_FILE": str(ca),
        "ORDERS_PAYPAL__CERT_HOST_ALLOWLIST": json.dumps([paypal_tls.url.removeprefix("https://")]),
        "ORDERS_SHIM__JWT_SECRET": JWT_SECRET,
    }
    s = Stack(env, tmp, engine, {"stripe": stripe_fake, "paypal": paypal_fake})
    # the fakes deliver to the shim, signed as the service expects (its configured secret and webhook id)
    stripe_fake.app.configure_webhooks(s.url + WEBHOOK_PATH, settings.stripe.webhook_secret.get_secret_value())
    paypal_fake.app.configure_webhooks(s.url + WEBHOOK_PATH, pki.signing_cert(), settings.paypal.webhook_id)
    s.start("worker", "--processes", "1")
    s.start("relay")
    s.start("shim", "--port", str(s.port))
    try:
        wait_until(lambda: _healthy(s.url), what="shim /healthz")
        yield s
    finally:
        s.stop()
        for server in (stripe_fake, paypal_fake, paypal_tls):
            server.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def return_page() -> Iterator[ReturnPage]:
    page = ReturnPage()
    yield page
    page.stop()


def test_following_the_paypal_approve_link_completes_the_order(stack, return_page):
    order = stack.place({"provider": "paypal", "return_url": return_page.url, "cancel_url": return_page.url})
    approve = order["next_action"]["approve_url"]
    assert approve.startswith(stack.fakes["paypal"].url)
    landed = httpx.get(approve, follow_redirects=True, timeout=10)  # what `curl -L` does
    assert landed.status_code == 200 and landed.text == "thank you for your order"
    paypal_order = parse_qs(urlsplit(approve).query)["token"][0]
    assert return_page.visits == [{"token": [paypal_order], "PayerID": ["FAKEPAYER0001"]}]
    wait_until(lambda: stack.status(order["order_id"]) == "completed", what="completed by the approval webhook")
    sent = [d for d in stack.deliveries("paypal") if d["event_type"] == "CHECKOUT.ORDER.APPROVED"]
    assert len(sent) == 1 and sent[0]["delivered"] and sent[0]["status"] == 200
    charges = httpx.get(stack.fakes["paypal"].url + "/_fake/charges").json()["orders"][order["order_id"]]
    assert charges["captures"] == 1 and charges["amount_captured"] == "3.00"
    # following the link again changes nothing: no second event, no second capture
    httpx.get(approve, follow_redirects=False, timeout=10)
    time.sleep(1)
    assert len([d for d in stack.deliveries("paypal") if d["event_type"] == "CHECKOUT.ORDER.APPROVED"]) == 1


def _three_d_secure_page(stack: Stack, client_secret: str) -> str:
    pi_id = client_secret.split("_secret_")[0]
    intent = httpx.get(
        f"{stack.fakes['stripe'].url}/v1/payment_intents/{pi_id}", auth=(fake_stripe.DEFAULT_API_KEY, "")
    ).json()
    assert intent["status"] == "requires_action"
    return str(intent["next_action"]["use_stripe_sdk"]["stripe_js"])


def test_the_stripe_3d_secure_page_completes_the_order(stack):
    order = stack.place({"provider": "stripe", "payment_method": "pm_card_threeDSecure2Required"})
    page = _three_d_secure_page(stack, order["next_action"]["client_secret"])
    done = httpx.get(page, follow_redirects=True, timeout=10)
    assert done.status_code == 200 and "succeeded" in done.text
    wait_until(lambda: stack.status(order["order_id"]) == "completed", what="completed by payment_intent.succeeded")
    sent = [d for d in stack.deliveries("stripe") if d["event_type"] == "payment_intent.succeeded"]
    assert sent and all(d["delivered"] for d in sent)
    # the page is used up
    assert httpx.get(page, timeout=10).status_code == 409


def test_a_failed_3d_secure_rejects_the_order(stack):
    order = stack.place({"provider": "stripe", "payment_method": "pm_card_threeDSecure2Required"})
    page = _three_d_secure_page(stack, order["next_action"]["client_secret"])
    assert httpx.get(page + "&outcome=failed", follow_redirects=True, timeout=10).status_code == 200
    wait_until(lambda: stack.status(order["order_id"]) == "rejected", what="rejected by payment_intent.payment_failed")
    failed = [d for d in stack.deliveries("stripe") if d["event_type"] == "payment_intent.payment_failed"]
    assert len(failed) == 1 and failed[0]["status"] == 200


def test_a_webhook_is_retried_while_the_receiver_answers_503():
    answers = [503, 503, 200]
    seen: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - stdlib naming
            seen.append((self.headers["X-Attempt"], self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(answers.pop(0))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sender = WebhookSender(f"http://127.0.0.1:{server.server_address[1]}/hook", attempts=4, backoff=0.05)
        calls = iter(range(1, 10))
        sender.send("evt_1", "test.event", b'{"id": "evt_1"}', lambda: {"X-Attempt": str(next(calls))})
        sender.wait_idle()
        [record] = sender.snapshot()
        assert [a["status"] for a in record["attempts"]] == [503, 503, 200] and record["delivered"]
        # the headers are made again for each attempt (a signature carries its time), the body is the same
        assert seen == [("1", b'{"id": "evt_1"}'), ("2", b'{"id": "evt_1"}'), ("3", b'{"id": "evt_1"}')]
        # a receiver that never answers well is given up on after the attempts
        answers.extend([500] * 4)
        sender.send("evt_2", "test.event", b"{}", dict)
        sender.wait_idle()
        assert sender.snapshot()[1]["delivered"] is False and len(sender.snapshot()[1]["attempts"]) == 4
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_receiver_is_given_up_on_after_the_attempts():
    sender = WebhookSender(f"http://127.0.0.1:{free_port()}/hook", attempts=2, backoff=0.01, timeout=2)
    sender.send(f"evt_{uuid.uuid4().hex[:8]}", "test.event", b"{}", dict)
    sender.wait_idle()
    [record] = sender.snapshot()
    assert record["delivered"] is False
    assert [a["status"] for a in record["attempts"]] == [None, None]
    assert "ConnectionRefused" in record["attempts"][0]["outcome"] or "URLError" in record["attempts"][0]["outcome"]
