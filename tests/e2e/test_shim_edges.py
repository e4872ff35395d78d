"""The shim's HTTP edge, against a real ``orders shim`` (uvicorn) on loopback, spoken to
with raw sockets where a well-behaved client cannot show the case: who may name the
client in X-Forwarded-For, oversized and slow request heads, slow bodies, and JSON
bodies that name a key twice."""

from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
import redis

from scripts.tcp_proxy import free_port
from tests.support import private_vhost, wait_until

JWT_SECRET = "shim-edge-tests-jwt-secret-of-32-bytes+"
VHOST = "orders-shim-edges"
BODY = {
    "items": [{"product_id": "sku-apple", "quantity": 1}],
    "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
}


@pytest.fixture(scope="module")
def amqp_url(settings: Any) -> str:
    return private_vhost(settings, VHOST)


class Shim:
    def __init__(self, port: int) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def auth(self, user: str = "edge-user") -> dict[str, str]:
        token = jwt.encode(
            {"sub": user, "roles": ["user"], "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"
        )
        return {"Authorization": f"Bearer {token}"}

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def post_raw(self, path: str, body: bytes, method: str = "POST") -> httpx.Response:
        return httpx.request(
            method,
            self.url + path,
            content=body,
            timeout=10,
            headers={**self.auth(), "Content-Type": "application/json"},
        )


def _start(service: Any, amqp_url: str, wait: Any, **env: str) -> Shim:
    shim = Shim(free_port())
    service("shim", "--port", str(shim.port), ORDERS_RABBITMQ__URL=amqp_url, ORDERS_SHIM__JWT_SECRET=JWT_SECRET, **env)
    wait(lambda: _healthy(shim.url), timeout=30, what="shim up")
    return shim


@pytest.fixture
def start_shim(service: Any, amqp_url: str, wait: Any) -> Any:
    """A shim of the test's own, with these ``ORDERS_*`` settings."""
    return lambda **env: _start(service, amqp_url, wait, **env)


@pytest.fixture(scope="module")
def shim(module_service: Any, amqp_url: str) -> Shim:
    """The module's shim: 16 KiB heads, and 1 s for a head or a body to arrive."""
    return _start(
        module_service,
        amqp_url,
        wait_until,
        ORDERS_SHIM__MAX_HEADER_BYTES="16384",
        ORDERS_SHIM__HEADER_TIMEOUT_SECONDS="1",
        ORDERS_SHIM__BODY_TIMEOUT_SECONDS="1",
    )


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


# -- X-Forwarded-For ----------------------------------------------------------------------


def _reads_from(shim: Shim, forwarded_for: list[str]) -> list[int]:
    """One GET per address, each claiming to come from it, all from 127.0.0.1."""
    return [
        httpx.get(
            f"{shim.url}/orders/{uuid.uuid4()}", timeout=10, headers={**shim.auth(), "X-Forwarded-For": address}
        ).status_code
        for address in forwarded_for
    ]


def _address_buckets(port: int) -> set[str]:
    keys = redis.Redis(port=port, decode_responses=True).keys("orders:rl:read:a:*")
    return {k.removeprefix("orders:rl:read:a:") for k in keys}


CLAIMED = ["203.0.113.7", "198.51.100.23", "192.0.2.200"]


def test_without_trusted_proxies_x_forwarded_for_does_not_choose_the_address_bucket(start_shim, private_redis):
    port = private_redis.port
    shim = start_shim(ORDERS_REDIS__PORT=str(port), ORDERS_SHIM__READ_RATE_PER_MINUTE_PER_ADDRESS="2")
    assert _reads_from(shim, CLAIMED) == [404, 404, 429]  # one bucket: the peer's
    assert _address_buckets(port) == {"127.0.0.1"}


def test_a_trusted_proxy_names_the_client_address_in_x_forwarded_for(start_shim, private_redis):
    port = private_redis.port
    shim = start_shim(
        ORDERS_REDIS__PORT=str(port),
        ORDERS_SHIM__READ_RATE_PER_MINUTE_PER_ADDRESS="2",
        ORDERS_SHIM__TRUSTED_PROXIES='["127.0.0.0/8"]',
    )
    assert _reads_from(shim, CLAIMED) == [404, 404, 404]  # a bucket each
    assert _address_buckets(port) == set(CLAIMED)


# -- request heads --------------------------------------------------------------------------


def test_a_request_head_over_the_limit_answers_431_without_waiting_for_its_end(shim):
    with shim.connect() as sock:  # the head never ends: the answer cannot wait for it
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: shim\r\nX-Filler: " + b"a" * 32768)
        answer = _read_all(sock)
    assert _status(answer) == 431 and b'"error":"headers_too_large"' in answer
    with shim.connect() as sock:  # a complete head just over the limit, in one write
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: shim\r\nX-Filler: " + b"a" * 16384 + b"\r\n\r\n")
        assert _status(_read_all(sock)) == 431
    with shim.connect() as sock:  # under the limit: served
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: shim\r\nConnection: close\r\nX-Filler: " + b"a" * 8192 + b"\r\n\r\n"
        )
        assert _status(_read_all(sock)) == 200


def test_a_request_head_that_stalls_answers_408_and_an_unused_connection_is_closed(shim):
    with shim.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: shim\r\n")  # ... and nothing more
        answer = _read_all(sock)
        assert _status(answer) == 408 and b'"error":"request_timeout"' in answer
        assert time.monotonic() - started < 3
    with shim.connect() as sock:
        started = time.monotonic()
        assert _read_all(sock) == b""  # closed, without an answer to a request never made
        assert time.monotonic() - started < 3


# -- request bodies ---------------------------------------------------------------------------


def test_a_body_that_stalls_answers_408_within_the_timeout_and_the_connection_closes(shim):
    body = json.dumps(BODY).encode()
    with shim.connect() as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /orders HTTP/1.1\r\nHost: shim\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:20]
        )  # the rest never comes
        answer = _read_all(sock)  # returns only once the server closed the connection
        elapsed = time.monotonic() - started
    assert _status(answer) == 408 and b'"error":"request_timeout"' in answer
    assert 0.9 < elapsed < 3


def test_a_client_that_disconnects_mid_body_places_nothing_even_when_the_part_sent_is_valid_json(shim, amqp_url):
    queued = _queued_orders(amqp_url)
    body = json.dumps(BODY).encode()
    token = shim.auth()["Authorization"].encode()
    with shim.connect() as sock:  # announces more than it sends: what came is a whole JSON document
        sock.sendall(
            b"POST /orders HTTP/1.1\r\nHost: shim\r\nContent-Type: application/json\r\n"
            b"Authorization: " + token + b"\r\nContent-Length: %d\r\n\r\n" % (len(body) + 50) + body
        )
        time.sleep(0.3)
    time.sleep(1.5)  # past the body timeout: a refusal or a placement would have happened by now
    assert _queued_orders(amqp_url) == queued


def test_a_normal_request_is_still_served_and_the_connection_kept_alive(shim):
    with httpx.Client(base_url=shim.url, timeout=10) as client:
        placed = client.post("/orders", json=BODY, headers=shim.auth())
        assert placed.status_code == 202, placed.text
        time.sleep(1.5)  # idle between requests: the keep-alive timeout (5 s) applies, not the head's
        read = client.get(placed.json()["status_url"], headers=shim.auth())
        assert read.status_code in (200, 404)  # no worker here: the order may not exist yet
        assert client.get("/healthz").status_code == 200
        assert client.post("/orders", json=BODY, headers=shim.auth()).status_code == 202


# -- duplicate JSON keys ----------------------------------------------------------------------


def _queued_orders(amqp_url: str) -> int:
    from worker.rabbit.connection import BlockingBroker

    broker = BlockingBroker(amqp_url).connect()
    try:
        return broker.queue_depth("orders.place")[0]
    finally:
        broker.close()


def test_a_json_body_naming_a_key_twice_answers_422_naming_the_key_and_where(shim, amqp_url):
    queued = _queued_orders(amqp_url)
    top = (
        b'{"product_id": "sku-apple", "quantity": 1, "quantity": 9999,'
        b' "payment": {"provider": "stripe", "payment_method": "pm_card_visa"}}'
    )
    r = shim.post_raw("/orders", top)
    assert r.status_code == 422 and r.json()["error"] == "validation_error"
    assert r.json()["fields"] == [{"field": "body", "message": "duplicate key 'quantity'"}]

    nested = (
        b'{"items": [{"product_id": "sku-apple", "quantity": 1, "quantity": 9999}],'
        b' "payment": {"provider": "stripe", "payment_method": "pm_card_visa"}}'
    )
    r = shim.post_raw("/orders", nested)
    assert r.status_code == 422 and r.json()["message"] == "body.items.0: duplicate key 'quantity'"

    r = shim.post_raw(f"/orders/{uuid.uuid4()}/cancel", b'{"reason": "a", "reason": "b"}', method="PUT")
    assert r.status_code == 422 and r.json()["message"] == "body: duplicate key 'reason'"

    r = shim.post_raw("/orders", b'{"items": [{"product_id": "sku-apple", "quantity": 1}')  # malformed: says where
    assert r.status_code == 422 and r.json()["error"] == "validation_error"
    assert r.json()["message"] == "body: invalid JSON at line 1, column 54: Expecting ',' delimiter"
    assert _queued_orders(amqp_url) == queued  # nothing was enqueued
