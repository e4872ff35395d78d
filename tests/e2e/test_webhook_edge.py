"""The payment webhook at the edge, against a real ``orders shim`` (uvicorn) on loopback.

Issue 20, item 6: 80 unauthenticated PayPal-looking webhooks whose
``PAYPAL-CERT-URL`` pointed at an allowed host on a port that accepts and
holds connections took the shim's whole thread pool: real webhooks and admin
reads waited the certificate fetch's timeout.  Here the same flood runs
against a TCP server that accepts and holds connections (``HoldingServer``),
once on a port that is not allow-listed (refused at once, whatever listens
there) and once on an allow-listed one (a PayPal host that hangs): at most a
few fetches are ever in flight, the rest are answered 503 at once, and real
requests keep being answered while the flood runs.  Item 7: a signed event
whose command would be invalid is refused with 400 and never published.

The PayPal side is real: the fake's https listener serves certificates from
a CA of this module's own, and real webhooks are signed with its signing
certificate.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import stripe

from scripts.fakes import fake_paypal, paypal_certs
from scripts.fakes.common import tls_context
from scripts.harness import RedisServer
from scripts.tcp_proxy import free_port
from tests.support import HoldingServer, private_vhost, wait_until

JWT_SECRET = "webhook-edge-tests-jwt-secret-of-32-bytes"
VHOST = "orders-webhook-edge"
WEBHOOK_ID = "EDGE-WEBHOOK"
WEBHOOK_PATH = "/orders/payment-confirmation"
#: the certificate fetch's timeout in the shim (paypal.timeout_seconds): what a held fetch costs
CERT_TIMEOUT = 8.0
#: the longest a request may take and still count as answered at once (a shared, busy machine)
QUICK = 2.0


@dataclass
class Edge:
    url: str
    amqp_url: str
    stripe_secret: str
    signer: paypal_certs.Issued
    cert_url: str  # the signing certificate on the fake's https listener (allow-listed)
    paypal_http_port: int  # the fake's plain http listener (not allow-listed)
    holding: HoldingServer  # allow-listed host and port, holds every connection
    elsewhere: HoldingServer  # holds every connection, port not allow-listed

    def admin(self) -> dict[str, str]:
        token = jwt.encode(
            {"sub": "ops", "roles": ["admin"], "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"
        )
        return {"Authorization": f"Bearer {token}"}

    def post(self, body: bytes, headers: dict[str, str], timeout: float = 30) -> httpx.Response:
        return httpx.post(
            self.url + WEBHOOK_PATH,
            content=body,
            headers={"Content-Type": "application/json", **headers},
            timeout=timeout,
        )

    def paypal(self, event: dict[str, Any], cert_url: str | None = None) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(event).encode()
        return body, paypal_certs.paypal_headers(self.signer, body, WEBHOOK_ID, cert_url or self.cert_url)

    def stripe(self, event: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        payload = json.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(payload, self.stripe_secret)
        return payload.encode(), {"Stripe-Signature": header}

    def queued(self, queue: str) -> int:
        from worker.rabbit.connection import BlockingBroker

        broker = BlockingBroker(self.amqp_url).connect()
        try:
            return broker.queue_depth(queue)[0]
        finally:
            broker.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def edge(module_service: Any, settings: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp: Path = tmp_path_factory.mktemp("webhook-edge")
    amqp_url = private_vhost(settings, VHOST)
    pki = paypal_certs.TestAuthority("Webhook edge tests PayPal Root CA")
    ca = pki.write_ca(tmp / "paypal-ca.pem")
    paypal_fake = fake_paypal.serve(0)
    paypal_tls = fake_paypal.serve(
        0, tls=tls_context(*map(str, paypal_certs.write_tls(pki.tls_cert(), tmp))), app=paypal_fake.app
    )
    signer = pki.signing_cert()
    paypal_fake.app.certs["CERT-edge"] = signer.cert_pem.decode()
    holding, elsewhere = HoldingServer(), HoldingServer()
    redis_server = RedisServer(tmp / "redis.log")  # the module's own rate-limit counters
    tls_origin = paypal_tls.url.removeprefix("https://")
    port = free_port()
    try:
        module_service(
            "shim",
            "--port",
            str(port),
            ORDERS_RABBITMQ__URL=amqp_url,
            ORDERS_REDIS__PORT=str(redis_server.port),
            ORDERS_SHIM__JWT_SECRET=JWT_SECRET,
            ORDERS_PAYPAL__BASE_URL=paypal_fake.url,
            ORDERS_PAYPAL__CERT_CA_FILE=str(ca),
            ORDERS_PAYPAL__CERT_HOST_ALLOWLIST=json.dumps([tls_origin, f"127.0.0.1:{holding.port}"]),
            ORDERS_PAYPAL__WEBHOOK_ID=WEBHOOK_ID,
            ORDERS_PAYPAL__TIMEOUT_SECONDS=str(CERT_TIMEOUT),
            # the flood's 80 requests each ask Redis for their rate limit: on a busy machine, let them wait
            # for a connection rather than be shed for it (shedding is tested elsewhere)
            ORDERS_SHIM__REDIS_POOL_TIMEOUT_SECONDS="2",
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(url), timeout=30, what="shim up")
        yield Edge(
            url=url,
            amqp_url=amqp_url,
            stripe_secret=settings.stripe.webhook_secret.get_secret_value(),
            signer=signer,
            cert_url=f"{paypal_tls.url}/_fake/certs/CERT-edge",
            paypal_http_port=int(paypal_fake.url.rsplit(":", 1)[1]),
            holding=holding,
            elsewhere=elsewhere,
        )
    finally:
        for server in (holding, elsewhere, redis_server, paypal_tls, paypal_fake):
            server.stop()


def capture_completed(order_id: str | None = None, custom_id: str | None = None) -> dict[str, Any]:
    """A PayPal ``PAYMENT.CAPTURE.COMPLETED`` event for one of our orders."""
    return {
        "id": f"WH-{uuid.uuid4().hex[:20].upper()}",
        "event_type": "PAYMENT.CAPTURE.COMPLETED",
        "resource_type": "capture",
        "resource": {
            "id": "42311647XV020574X",
            "status": "COMPLETED",
            "amount": {"currency_code": "USD", "value": "1.50"},
            "custom_id": custom_id or order_id or str(uuid.uuid4()),
            "supplementary_data": {"related_ids": {"order_id": "5O190127TN364715T"}},
        },
    }


def intent_succeeded(**changes: Any) -> dict[str, Any]:
    """A Stripe ``payment_intent.succeeded`` event for one of our orders."""
    intent = {
        "id": "pi_" + uuid.uuid4().hex[:24],
        "object": "payment_intent",
        "amount": 150,
        "amount_received": 150,
        "currency": "usd",
        "status": "succeeded",
        "metadata": {"order_id": str(uuid.uuid4())},
        **changes,
    }
    return {"id": "evt_" + uuid.uuid4().hex[:24], "type": "payment_intent.succeeded", "data": {"object": intent}}


def _timed(call: Any) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    answer = call()
    return answer, time.monotonic() - began


# -- item 6: the certificate fetch cannot tie up the shim ---------------------------------------


def test_a_certificate_url_on_a_port_not_allowed_is_refused_at_once_whatever_listens_there(edge):
    """Before: a port that holds connections answered after the fetch's timeout (503), a closed one at
    once (503), an open one with a TLS error (400): the answer time told the ports apart."""
    urls = {
        "closed": f"https://127.0.0.1:{free_port()}/c",
        "holds connections": f"https://127.0.0.1:{edge.elsewhere.port}/c",
        "answers http": f"https://127.0.0.1:{edge.paypal_http_port}/_fake/certs/CERT-edge",
    }
    answers = {}
    for kind, cert_url in urls.items():
        answer, took = _timed(lambda cert_url=cert_url: edge.post(*edge.paypal(capture_completed(), cert_url)))
        answers[kind] = (answer.status_code, answer.text)
        assert took < QUICK, f"{kind}: {took:.2f} s"
    assert set(answers.values()) == {
        (400, '{"error":"invalid_signature","message":"the webhook signature did not verify"}')
    }, answers
    assert edge.elsewhere.accepted == 0  # nothing was even tried


def test_a_flood_of_certificate_urls_that_hang_leaves_real_requests_answered_at_once(edge):
    # a real PayPal webhook first: its certificate is fetched once and kept
    real = edge.post(*edge.paypal(capture_completed()))
    assert real.status_code == 200 and real.json()["enqueued"] is True, real.text
    hostile = [
        edge.paypal(capture_completed(), f"https://127.0.0.1:{edge.holding.port}/certs/CERT-{i}") for i in range(80)
    ]  # signed before the flood, so that the 80 requests leave together

    async def flood() -> list[tuple[int, str, float]]:
        async with httpx.AsyncClient(base_url=edge.url, timeout=60, limits=httpx.Limits(max_connections=100)) as client:

            async def one(body: bytes, headers: dict[str, str]) -> tuple[int, str, float]:
                began = time.monotonic()
                answer = await client.post(WEBHOOK_PATH, content=body, headers=headers)
                return answer.status_code, answer.json()["error"], time.monotonic() - began

            return await asyncio.gather(*(one(body, headers) for body, headers in hostile))

    with ThreadPoolExecutor(max_workers=1) as runner:
        started = time.monotonic()
        flooding = runner.submit(asyncio.run, flood())
        wait_until(lambda: edge.holding.accepted >= 1, timeout=30, interval=0.01, what="the flood's first fetch")
        first_fetch = time.monotonic() - started
        # while the held fetches wait for their timeout: an admin read (PostgreSQL, in the thread pool),
        # a real Stripe webhook and a real PayPal webhook (its certificate cached) are answered at once
        checks = [
            (
                "admin read",
                lambda: httpx.get(f"{edge.url}/orders/{uuid.uuid4()}/history", headers=edge.admin(), timeout=60),
            ),
            ("stripe webhook", lambda: edge.post(*edge.stripe(intent_succeeded()))),
            ("paypal webhook", lambda: edge.post(*edge.paypal(capture_completed()))),
            (
                "admin read again",
                lambda: httpx.get(f"{edge.url}/orders/{uuid.uuid4()}/history", headers=edge.admin(), timeout=60),
            ),
        ]
        timings = {}
        for name, call in checks:
            answer, took = _timed(call)
            timings[name] = (answer.status_code, round(took, 3))
        during = time.monotonic() - started - first_fetch
        answers = flooding.result(timeout=120)
    # before: each check queued behind the held fetches, for CERT_TIMEOUT or more
    assert during < CERT_TIMEOUT, f"the checks outlasted the held fetches ({during:.1f} s): {timings}"
    assert [status for status, _took in timings.values()] == [404, 200, 200, 404], timings
    assert all(took < CERT_TIMEOUT / 4 for _status, took in timings.values()), timings

    assert 1 <= edge.holding.accepted <= 4  # at most four fetches in flight; then the host is remembered as failed
    assert {status for status, _error, _took in answers} == {503}
    shed = [took for _status, error, took in answers if error == "overloaded"]
    assert shed and max(shed) < CERT_TIMEOUT / 2, answers  # refused at once, never queued for a slot
    # the same URL again: remembered, answered without a connection
    again, took = _timed(
        lambda: edge.post(*edge.paypal(capture_completed(), f"https://127.0.0.1:{edge.holding.port}/certs/CERT-0"))
    )
    assert again.status_code == 503 and took < CERT_TIMEOUT / 4 and edge.holding.accepted <= 4
    metrics = httpx.get(edge.url + "/metrics", timeout=10).text
    shed_by = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("orders_shim_shed_total{")
    }
    # for want of a fetch slot (and, should the machine be very busy, for want of a Redis connection)
    assert shed_by.get("certificate_fetch", 0) >= 1 and sum(shed_by.values()) == len(shed), (shed_by, len(shed))


# -- item 7: a signed event whose command would be invalid is refused, not published -----------


@pytest.mark.parametrize(
    "changes",
    [{"amount": -5, "amount_received": -5}, {"metadata": {"order_id": "not-a-uuid"}}, {"currency": "us\u0000"}],
    ids=["amount-negative", "order-not-uuid", "currency-nul"],
)
def test_a_signed_stripe_event_that_would_make_an_invalid_command_answers_400_and_publishes_nothing(edge, changes):
    queued = edge.queued("orders.payment-confirmed")
    answer = edge.post(*edge.stripe(intent_succeeded(**changes)))
    assert answer.status_code == 400, answer.text  # before: 200 enqueued, then dead-lettered by the worker
    assert answer.json()["error"] == "invalid_webhook"
    assert edge.queued("orders.payment-confirmed") == queued


def test_a_signed_paypal_event_that_would_make_an_invalid_command_answers_400_and_publishes_nothing(edge):
    queued = edge.queued("orders.payment-confirmed")
    answer = edge.post(*edge.paypal(capture_completed(custom_id="not-a-uuid")))
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_webhook", answer.text
    assert edge.queued("orders.payment-confirmed") == queued
    good = edge.post(*edge.paypal(capture_completed()))  # the same event, well formed: published
    assert good.status_code == 200 and good.json()["enqueued"] is True
    assert wait_until(lambda: edge.queued("orders.payment-confirmed") == queued + 1, timeout=10)
