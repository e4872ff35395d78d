"""The real ``orders shim --workers 2`` with Redis unreachable: the process count reaches each
worker, and each enforces its share of the limit (the in-process cases:
``tests/integration/test_shim_ratelimit.py``)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from scripts.tcp_proxy import free_port
from tests.integration.test_shim_ratelimit import BODY, HIGH, JWT_SECRET, VHOST, _auth, _user
from tests.support import private_vhost


@pytest.fixture(scope="module")
def amqp_url(settings: Any) -> str:
    return private_vhost(settings, VHOST)


def test_each_shim_worker_process_enforces_its_share_while_redis_is_unreachable(
    service, amqp_url, tcp_proxy, settings, wait
):
    proxy = tcp_proxy(settings.redis.port)
    proxy.down()  # Redis unreachable from the start
    port = free_port()
    service(
        "shim",
        "--port",
        str(port),
        "--workers",
        "2",
        ORDERS_RABBITMQ__URL=amqp_url,
        ORDERS_REDIS__PORT=str(proxy.port),
        ORDERS_SHIM__JWT_SECRET=JWT_SECRET,
        ORDERS_SHIM__PLACE_RATE_PER_MINUTE="8",
        ORDERS_SHIM__PLACE_RATE_PER_MINUTE_PER_ADDRESS=HIGH,
    )
    url = f"http://127.0.0.1:{port}"
    wait(lambda: _ready(url), timeout=60, what="shim ready")
    ready = httpx.get(url + "/readyz", timeout=10).json()
    assert ready["rate_limits"] == {"mode": "local", "share_of": 2}  # --workers 2 reached the worker

    user, started = _user("judy"), time.monotonic()
    with httpx.Client(base_url=url, headers=_auth(user), timeout=10) as client:
        codes = [client.post("/orders", json=BODY) for _ in range(200)]
    elapsed = time.monotonic() - started
    accepted = sum(r.status_code == 202 for r in codes)
    # each process: its 4 at once, plus what its bucket refilled meanwhile (4 a minute)
    assert 4 <= accepted <= 2 * int(4 + elapsed * 4 / 60)
    assert {r.status_code for r in codes} == {202, 429}
    assert {r.headers["RateLimit-Limit"] for r in codes} == {"4"}


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
