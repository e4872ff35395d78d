"""What the shim answers to a body that is not JSON, not well-formed JSON, or nested too deeply.

The shim app runs in-process (Starlette's TestClient) with the shipped
configuration; these answers come before authentication and before any
connection is opened, so no server is needed.  (The webhook route asks
its rate limit first: Redis is pointed at a port nobody listens on, so the
limit is decided in-process.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import stripe
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from scripts.tcp_proxy import free_port
from worker.settings import load_settings
from worker.shim.app import create_app

PLACE = (
    b'{"items": [{"product_id": "sku-apple", "quantity": 1}],\n'
    b' "payment": {"provider": "stripe", "payment_method": "pm_card_visa"}}'
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # Redis on a port nobody listens on: the webhook's rate limit is decided in-process, no server asked
    settings = load_settings(environ={"ORDERS_REDIS__PORT": str(free_port())})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


MESSAGE_415 = "the request body must be JSON sent as Content-Type: application/json (charset utf-8, or none)"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"user_id=alice&items=sku-apple"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n'),
        ("text/plain", PLACE),
        (None, PLACE),
        ("application/json; charset=utf-16", PLACE),  # JSON is UTF-8; another charset is not guessed at
        ("application/json; charset=latin-1", PLACE),
        ("application/evil+json", PLACE),  # FastAPI reads any application/*+json as JSON
        ("application/vnd.orders+json", PLACE),
        ("application/json; boundary=x", PLACE),
        ("application/jsonx", PLACE),
        ("text/<script>alert(1)</script>", PLACE),
    ],
)  # fmt: skip
def test_a_body_not_sent_as_json_is_refused_with_415_echoing_nothing_of_the_request(
    client: TestClient, content_type: str | None, body: bytes
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for method, path in (("POST", "/orders"), ("PUT", f"/orders/{uuid.uuid4()}/cancel")):
        r = client.request(method, path, content=body, headers=headers)
        assert r.status_code == 415, r.text
        assert r.json() == {"error": "unsupported_media_type", "message": MESSAGE_415}  # the same, whatever was sent


def test_malformed_json_is_answered_with_its_line_and_column(client: TestClient) -> None:
    broken = PLACE.replace(b'"payment": {', b'"payment" {')  # on the second line, column 12
    r = client.post("/orders", content=broken, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json() == {
        "error": "validation_error",
        "message": "body: invalid JSON at line 2, column 12: Expecting ':' delimiter",
        "fields": [{"field": "body", "message": "invalid JSON at line 2, column 12: Expecting ':' delimiter"}],
    }


def test_a_body_that_is_not_utf8_is_answered_as_invalid_json(client: TestClient) -> None:
    r = client.post("/orders", content=b'{"user_id": "\xff"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["message"] == "body: invalid JSON: the body is not UTF-8 text"


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON;Charset=UTF-8", 'application/json; charset="utf-8"'],
)  # fmt: skip
def test_json_bodies_pass_on_to_authentication(client: TestClient, content_type: str) -> None:
    r = client.post("/orders", content=PLACE, headers={"Content-Type": content_type})
    assert r.status_code == 401, r.text  # past the body checks: no token


DEEP = b'{"items": ' + b"[" * 5000 + b"]" * 5000 + b', "payment": {"provider": "stripe", "payment_method": "pm_x"}}'


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/orders"), ("PUT", f"/orders/{uuid.uuid4()}/cancel")], ids=["place", "cancel"]
)
@pytest.mark.parametrize(
    "body", [DEEP, b'{"reason": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"], ids=["arrays", "objects"]
)
def test_json_nested_5000_deep_answers_422_and_logs_one_line_without_a_traceback(
    client: TestClient, method: str, path: str, body: bytes
) -> None:
    with capture_logs() as logs:
        r = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "validation_error" and r.json()["message"] == "body: invalid JSON: nested too deeply"
    assert [(e["log_level"], e["event"]) for e in logs] == [("warning", "request body refused: JSON nested too deeply")]
    assert not [e for e in logs if "exc_info" in e]


def test_a_signed_stripe_webhook_nested_5000_deep_answers_400_invalid_webhook_without_a_traceback(
    client: TestClient,
) -> None:
    secret = load_settings(environ={}).stripe.webhook_secret.get_secret_value()
    payload = '{"id": "evt_deep", "type": "payment_intent.succeeded", "data": ' + "[" * 5000 + "]" * 5000 + "}"
    signature = stripe.WebhookSignature.generate_signature_header(payload, secret)
    with capture_logs() as logs:
        r = client.post(
            "/orders/payment-confirmation",
            content=payload,
            headers={"Content-Type": "application/json", "Stripe-Signature": signature},
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_webhook"
    assert "signed webhook is not a readable event" in [e["event"] for e in logs]
    assert not [e for e in logs if e["log_level"] == "error" or "exc_info" in e]


def test_an_empty_body_is_no_media_type_question(client: TestClient) -> None:
    r = client.put(f"/orders/{uuid.uuid4()}/cancel", content=b"", headers={"Content-Type": "text/plain"})
    assert r.status_code == 401, r.text  # the cancel body is optional
