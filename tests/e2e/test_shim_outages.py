"""The shim under failure and load: Redis gone, RabbitMQ gone, rate limits under
concurrency.  The machine's real Redis and RabbitMQ are never stopped: Redis
is a private ``redis-server`` the test kills, RabbitMQ sits behind a TCP
proxy the test cuts."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import text

from scripts import harness
from scripts.tcp_proxy import free_port
from tests.support import private_vhost

HIGH = "100000"
JWT_SECRET = "shim-tests-jwt-secret-of-at-least-32-bytes"
VHOST = "orders-shim-outages"


@pytest.fixture(scope="module")
def amqp_url(settings: Any) -> str:
    """A vhost of this module's own: other runs' workers never take its commands."""
    return private_vhost(settings, VHOST)


@pytest.fixture
def worker(service: Any, amqp_url: str) -> Any:
    return service("worker", "--processes", "1", ORDERS_RABBITMQ__URL=amqp_url)


class Shim:
    def __init__(self, url: str) -> None:
        self.url, self.secret = url, JWT_SECRET

    def auth(self, user: str, roles: tuple[str, ...] = ("user",)) -> dict[str, str]:
        now = int(time.time())
        token = jwt.encode({"sub": user, "roles": list(roles), "exp": now + 600}, self.secret, algorithm="HS256")
        return {"Authorization": f"Bearer {token}"}

    def place(self, user: str, key: str | None = None) -> httpx.Response:
        headers = {**self.auth(user), **({"Idempotency-Key": key} if key else {})}
        return httpx.post(
            self.url + "/orders",
            headers=headers,
            timeout=30,
            json={
                "product_id": "sku-apple",
                "quantity": 1,
                "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
            },
        )

    def get(self, order_id: str, user: str) -> httpx.Response:
        return httpx.get(f"{self.url}/orders/{order_id}", headers=self.auth(user), timeout=10)


@pytest.fixture
def start_shim(service: Any, amqp_url: str, wait: Any) -> Any:
    def start(**env: str) -> Shim:
        port = free_port()
        limits = {
            f"ORDERS_SHIM__{k}": HIGH
            for k in (
                "PLACE_RATE_PER_MINUTE",
                "READ_RATE_PER_MINUTE",
                "PLACE_RATE_PER_MINUTE_PER_ADDRESS",
                "READ_RATE_PER_MINUTE_PER_ADDRESS",
            )
        }
        service(
            "shim",
            "--port",
            str(port),
            **{**limits, "ORDERS_RABBITMQ__URL": amqp_url, "ORDERS_SHIM__JWT_SECRET": JWT_SECRET, **env},
        )
        shim = Shim(f"http://127.0.0.1:{port}")
        wait(lambda: _healthy(shim.url), timeout=30, what="shim up")
        return shim

    return start


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _orders(engine: Any, ids: list[str]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM orders WHERE order_id = ANY(CAST(:ids AS uuid[]))"), {"ids": ids}
            ).scalar_one()
        )


def test_reads_still_answer_when_redis_stops_mid_test(worker, start_shim, private_redis, clean_db, wait):
    port = private_redis.port
    shim = start_shim(ORDERS_REDIS__PORT=str(port))
    order_id = shim.place("erin").json()["order_id"]
    wait(lambda: shim.get(order_id, "erin").status_code == 200, what="order visible")
    keyed = shim.place("erin", key="redis-outage-1").json()["order_id"]

    private_redis.stop()
    started = time.monotonic()
    r = shim.get(order_id, "erin")
    assert r.status_code == 200 and r.json()["order_id"] == order_id  # from PostgreSQL
    assert time.monotonic() - started < 2
    assert shim.get(order_id, "mallory").status_code == 404  # ownership still holds
    # placing is limited in-process (counted) and replays keep their order id
    assert shim.place("erin").status_code == 202
    assert shim.place("erin", key="redis-outage-1").json()["order_id"] == keyed
    ready = httpx.get(shim.url + "/readyz", timeout=10)  # a cache outage must not take the shim out of service
    assert ready.status_code == 200 and ready.json()["checks"]["redis"].startswith("unavailable")
    assert ready.json()["rate_limits"] == {"mode": "local", "share_of": 1}
    metrics = httpx.get(shim.url + "/metrics").text
    assert "orders_shim_ratelimit_unavailable_total 0.0" not in metrics
    assert 'orders_shim_ratelimit_mode{mode="local"} 1.0' in metrics
    assert 'orders_shim_cache_requests_total{result="error"}' in metrics


def test_rabbitmq_unreachable_answers_503_with_retry_after_and_loses_nothing(
    worker, start_shim, amqp_url, clean_db, tcp_proxy, wait
):
    proxy = tcp_proxy(harness.amqp_port(amqp_url))
    url = harness.with_amqp_port(amqp_url, proxy.port)
    shim = start_shim(ORDERS_RABBITMQ__URL=url, ORDERS_SHIM__PUBLISH_TIMEOUT_SECONDS="1")
    assert shim.place("frank").status_code == 202

    keys = [f"outage-{uuid.uuid4()}" for _ in range(40)]
    answers: dict[str, list[int]] = {k: [] for k in keys}
    order_ids: dict[str, str] = {}

    def post(key: str) -> None:
        r = shim.place("frank", key=key)
        answers[key].append(r.status_code)
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) > 0 and r.json()["error"] == "broker_unavailable"
        elif r.status_code == 202:
            order_ids[key] = r.json()["order_id"]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, keys[:10]))
        proxy.down()  # the broker goes away in the middle of the traffic
        list(pool.map(post, keys[10:]))
        ready = httpx.get(shim.url + "/readyz", timeout=15)
        assert ready.status_code == 503 and ready.json()["checks"]["rabbitmq"].startswith("unavailable")
        proxy.up()
        # clients retry what answered 503, with the same Idempotency-Key
        list(pool.map(post, [k for k in keys if k not in order_ids]))
    assert any(503 in codes for codes in answers.values())
    assert set(order_ids) == set(keys), "every key ends with a 202"
    wait(lambda: _orders(clean_db, list(order_ids.values())) == len(keys), what="every accepted order placed")


def test_rate_limits_hold_exactly_under_concurrent_requests(worker, start_shim, private_redis, clean_db, wait):
    port = private_redis.port
    shim = start_shim(
        ORDERS_REDIS__PORT=str(port),
        ORDERS_SHIM__PLACE_RATE_PER_MINUTE="7",
        ORDERS_SHIM__READ_RATE_PER_MINUTE="5",
        ORDERS_SHIM__PLACE_RATE_PER_MINUTE_PER_ADDRESS="12",
    )
    with ThreadPoolExecutor(30) as pool:
        placed = list(pool.map(lambda _: shim.place("carol"), range(30)))
    assert sorted(r.status_code for r in placed) == [202] * 7 + [429] * 23
    refused = next(r for r in placed if r.status_code == 429)
    assert refused.json()["error"] == "rate_limited" and 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit-Remaining"] == "0" and refused.headers["RateLimit-Limit"] == "7"

    order_id = next(r for r in placed if r.status_code == 202).json()["order_id"]
    wait(lambda: _orders(clean_db, [order_id]) == 1, what="placed")
    with ThreadPoolExecutor(20) as pool:  # reads have their own limit
        reads = list(pool.map(lambda _: shim.get(order_id, "carol").status_code, range(20)))
    assert sorted(reads) == [200] * 5 + [429] * 15

    with ThreadPoolExecutor(30) as pool:  # another user, same address: 12 - 7 left for the address
        others = list(pool.map(lambda _: shim.place("dave").status_code, range(30)))
    assert sorted(others) == [202] * 5 + [429] * 25
