"""What the shim answers to a body that is not JSON, or not well-formed JSON.

The shim app runs in-process (Starlette's TestClient) with the shipped
configuration; these answers come before authentication and before any
connection is opened, so no server is needed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from worker.settings import load_settings
from worker.shim.app import create_app

PLACE = (
    b'{"items": [{"product_id": "sku-apple", "quantity": 1}],\n'
    b' "payment": {"provider": "stripe", "payment_method": "pm_card_visa"}}'
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(load_settings(environ={})), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    ("content_type", "body", "named"),
    [
        ("application/x-www-form-urlencoded", b"user_id=alice&items=sku-apple", "application/x-www-form-urlencoded"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n', "multipart/form-data"),
        ("text/plain", PLACE, "text/plain"),
        (None, PLACE, "no Content-Type"),
    ],
)  # fmt: skip
def test_a_body_not_sent_as_json_is_refused_with_415_naming_application_json(
    client: TestClient, content_type: str | None, body: bytes, named: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for method, path in (("POST", "/orders"), ("PUT", f"/orders/{uuid.uuid4()}/cancel")):
        r = client.request(method, path, content=body, headers=headers)
        assert r.status_code == 415, r.text
        assert r.json()["error"] == "unsupported_media_type"
        assert "Content-Type: application/json" in r.json()["message"] and named in r.json()["message"]


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
    "content_type", ["application/json", "application/json; charset=utf-8", "application/vnd.orders+json"]
)
def test_json_bodies_pass_on_to_authentication(client: TestClient, content_type: str) -> None:
    r = client.post("/orders", content=PLACE, headers={"Content-Type": content_type})
    assert r.status_code == 401, r.text  # past the body checks: no token


def test_an_empty_body_is_no_media_type_question(client: TestClient) -> None:
    r = client.put(f"/orders/{uuid.uuid4()}/cancel", content=b"", headers={"Content-Type": "text/plain"})
    assert r.status_code == 401, r.text  # the cancel body is optional
