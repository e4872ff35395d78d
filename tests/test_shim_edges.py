"""The shim's HTTP edge, against a real ``orders shim`` (uvicorn) on loopback: who may
name the client in X-Forwarded-For."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
import redis
from scripts.tcp_proxy import free_port
from tests.support import private_vhost

JWT_SECRET = "shim-edge-tests-jwt-secret-of-32-bytes+"
VHOST = "orders-shim-edges"


@pytest.fixture(scope="module")
def amqp_url(settings: Any) -> str:
    return private_vhost(settings, VHOST)


class Shim:
    def __init__(self, port: int) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def auth(self, user: str = "edge-user") -> dict[str, str]:
        token = jwt.encode({"sub": user, "roles": ["user"], "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
        return {"Authorization": f"Bearer {token}"}


def _start(service: Any, amqp_url: str, wait: Any, **env: str) -> Shim:
    shim = Shim(free_port())
    service("shim", "--port", str(shim.port), ORDERS_RABBITMQ__URL=amqp_url, ORDERS_SHIM__JWT_SECRET=JWT_SECRET, **env)
    wait(lambda: _healthy(shim.url), timeout=30, what="shim up")
    return shim


@pytest.fixture
def start_shim(service: Any, amqp_url: str, wait: Any) -> Any:
    """A shim of the test's own, with these ``ORDERS_*`` settings."""
    return lambda **env: _start(service, amqp_url, wait, **env)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- X-Forwarded-For ----------------------------------------------------------------------


def _reads_from(shim: Shim, forwarded_for: list[str]) -> list[int]:
    """One GET per address, each claiming to come from it, all from 127.0.0.1."""
    return [httpx.get(f"{shim.url}/orders/{uuid.uuid4()}", timeout=10,
                      headers={**shim.auth(), "X-Forwarded-For": address}).status_code for address in forwarded_for]


def _address_buckets(port: int) -> set[str]:
    keys = redis.Redis(port=port, decode_responses=True).keys("orders:rl:read:a:*")
    return {k.removeprefix("orders:rl:read:a:") for k in keys}


CLAIMED = ["203.0.113.7", "198.51.100.23", "192.0.2.200"]


def test_without_trusted_proxies_x_forwarded_for_does_not_choose_the_address_bucket(start_shim, private_redis):
    port, _ = private_redis
    shim = start_shim(ORDERS_REDIS__PORT=str(port), ORDERS_SHIM__READ_RATE_PER_MINUTE_PER_ADDRESS="2")
    assert _reads_from(shim, CLAIMED) == [404, 404, 429]  # one bucket: the peer's
    assert _address_buckets(port) == {"127.0.0.1"}


def test_a_trusted_proxy_names_the_client_address_in_x_forwarded_for(start_shim, private_redis):
    port, _ = private_redis
    shim = start_shim(ORDERS_REDIS__PORT=str(port), ORDERS_SHIM__READ_RATE_PER_MINUTE_PER_ADDRESS="2",
                      ORDERS_SHIM__TRUSTED_PROXIES='["127.0.0.0/8"]')
    assert _reads_from(shim, CLAIMED) == [404, 404, 404]  # a bucket each
    assert _address_buckets(port) == set(CLAIMED)
