"""Rate limits when they matter most: Redis unreachable, and the shim overloaded.

The shim app runs in-process (Starlette's TestClient) against the real Redis
behind the cuttable TCP proxy, real RabbitMQ (a vhost of this module's own)
and PostgreSQL.  In-process, the test holds what would otherwise race: the
fallback limiter's clock, and the Redis pool's only connection (an overload
made on purpose), so every count below is exact.  The real ``orders shim --workers 2``
is in ``tests/e2e/test_shim_ratelimit_workers.py``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from tests.support import private_vhost

JWT_SECRET = "shim-ratelimit-tests-jwt-secret-of-32-bytes"
VHOST = "orders-shim-ratelimit"
HIGH = "100000"
BODY = {"product_id": "sku-apple", "quantity": 1, "payment": {"provider": "stripe", "payment_method": "pm_card_visa"}}


@pytest.fixture(scope="module")
def amqp_url(settings: Any) -> str:
    return private_vhost(settings, VHOST)


@pytest.fixture
def redis_proxy(settings: Any, tcp_proxy: Any) -> Any:
    return tcp_proxy(settings.redis.port)


def _auth(user: str) -> dict[str, str]:
    token = jwt.encode({"sub": user, "roles": ["user"], "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


def _user(name: str) -> str:
    """A user of this run only: Redis counters of an earlier run live for a minute."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shim_app(settings: Any, amqp_url: str, redis_proxy: Any) -> Iterator[Callable[..., TestClient]]:
    """Factory: the shim app in this process, its Redis through ``redis_proxy`` (or on ``redis_port``);
    ``shim.*`` overrides as kwargs."""
    from worker.settings import load_settings
    from worker.shim.app import create_app

    made: list[TestClient] = []

    def start(redis_port: int | None = None, **shim: Any) -> TestClient:
        env = {
            **os.environ,
            "ORDERS_RABBITMQ__URL": amqp_url,
            "ORDERS_REDIS__PORT": str(redis_port or redis_proxy.port),
            "ORDERS_SHIM__JWT_SECRET": JWT_SECRET,
            **{
                f"ORDERS_SHIM__{k}": HIGH
                for k in (
                    "READ_RATE_PER_MINUTE",
                    "PLACE_RATE_PER_MINUTE_PER_ADDRESS",
                    "READ_RATE_PER_MINUTE_PER_ADDRESS",
                )
            },
            **{f"ORDERS_SHIM__{k.upper()}": str(v) for k, v in shim.items()},
        }
        client = TestClient(create_app(load_settings(environ=env)), raise_server_exceptions=False)
        client.__enter__()
        made.append(client)
        return client

    yield start
    for client in made:
        client.__exit__(None, None, None)


def _place(client: TestClient, user: str) -> Any:
    return client.post("/orders", json=BODY, headers=_auth(user))


def _metric(client: TestClient, line: str) -> float:
    for row in client.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    raise AssertionError(f"{line} not in /metrics")


def test_with_redis_unreachable_a_burst_beyond_the_process_share_is_refused(shim_app, redis_proxy):
    shim = shim_app(PLACE_RATE_PER_MINUTE=40, WORKERS=4)  # 4 processes: each allows 10 a minute alone
    now = [1000.0]
    shim.app.state.shim.limiter.local.clock = lambda: now[0]  # held still: refills only when the test says
    user = _user("ivan")
    first = _place(shim, user)
    assert first.status_code == 202 and first.headers["RateLimit-Limit"] == "40"  # in Redis, shared

    with capture_logs() as logs:
        redis_proxy.down()
        answers = [_place(shim, user) for _ in range(200)]
        # the share of what Redis said was left: 10 x 39/40 = 9.75 tokens
        assert [r.status_code for r in answers] == [202] * 9 + [429] * 191
        refused = answers[9]
        assert refused.json()["error"] == "rate_limited"
        assert refused.headers["Retry-After"] == "2"  # the quarter token missing, at 10 a minute
        assert (
            refused.headers["RateLimit-Limit"],
            refused.headers["RateLimit-Remaining"],
            refused.headers["RateLimit-Policy"],
        ) == ("10", "0", "10;w=60")
        assert answers[8].headers["RateLimit-Remaining"] == "0" and answers[0].headers["RateLimit-Remaining"] == "8"

        now[0] += 6  # one token back, no more
        assert [_place(shim, user).status_code for _ in range(2)] == [202, 429]

        ready = shim.get("/readyz")  # Redis down does not take the shim out of service
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["checks"]["redis"].startswith("unavailable")
        assert ready.json()["rate_limits"] == {"mode": "local", "share_of": 4}
        assert _metric(shim, 'orders_shim_ratelimit_mode{mode="local"}') == 1
        assert _metric(shim, 'orders_shim_ratelimit_mode{mode="redis"}') == 0
        assert _metric(shim, "orders_shim_ratelimit_unavailable_total") == 202
        assert _metric(shim, 'orders_shim_rate_limited_total{kind="place"}') == 192

        redis_proxy.up()
        assert shim.get("/readyz").json()["rate_limits"]["mode"] == "redis"  # the probe notices at once
        back = _place(shim, user)
        assert back.status_code == 202 and back.headers["RateLimit-Limit"] == "40"
        assert back.headers["RateLimit-Remaining"] == "38"  # the Redis count resumes where it was
        assert _metric(shim, 'orders_shim_ratelimit_mode{mode="redis"}') == 1

    events = [e["event"] for e in logs]
    assert events.count("rate limits enforced in-process while redis is unreachable") == 1
    assert events.count("rate limits enforced in redis again") == 1


def test_an_exhausted_redis_pool_sheds_with_503_while_limits_stay_on_for_others(shim_app):
    shim = shim_app(PLACE_RATE_PER_MINUTE=3, REDIS_POOL_SIZE=1, REDIS_POOL_TIMEOUT_SECONDS=0.05)
    pool = shim.app.state.shim.redis.connection_pool
    flooder, other = _user("mallory"), _user("olga")

    with capture_logs() as logs:
        others = []
        for _ in range(4):
            held = shim.portal.call(pool.get_connection)  # every connection busy: the overload
            shed = [_place(shim, flooder) for _ in range(5)]
            assert [r.status_code for r in shed] == [503] * 5
            assert {(r.json()["error"], r.headers["Retry-After"]) for r in shed} == {("overloaded", "1")}
            shim.portal.call(pool.release, held)
            others.append(_place(shim, other))  # a connection free: served, and limited, in Redis
    assert [r.status_code for r in others] == [202, 202, 202, 429]
    assert [r.headers["RateLimit-Limit"] for r in others] == ["3"] * 4
    assert others[3].json()["error"] == "rate_limited"
    # shed requests never reached the limiter: the flooder's own limit is whole
    assert [_place(shim, flooder).status_code for _ in range(4)] == [202, 202, 202, 429]

    assert not [e for e in logs if e["event"] == "redis unavailable"]  # the gate never tripped
    assert shim.get("/readyz").json()["rate_limits"]["mode"] == "redis"
    assert _metric(shim, 'orders_shim_shed_total{reason="redis_pool"}') == 20
    assert _metric(shim, "orders_shim_ratelimit_unavailable_total") == 0


def test_a_redis_outage_hands_no_client_a_fresh_limit(shim_app, private_redis):
    """Each bucket starts from what the client had left in Redis: a spent limit stays spent."""
    shim = shim_app(redis_port=private_redis.port, PLACE_RATE_PER_MINUTE=3)
    now = [1000.0]
    shim.app.state.shim.limiter.local.clock = lambda: now[0]
    spender, light = _user("sam"), _user("lia")
    assert [_place(shim, spender).status_code for _ in range(4)] == [202, 202, 202, 429]  # in Redis
    assert _place(shim, light).status_code == 202  # one of three used

    private_redis.stop()  # SIGKILL: Redis is gone mid-test
    after = _place(shim, spender)
    assert after.status_code == 429, after.text  # before: a fresh bucket, 202
    assert after.headers["RateLimit-Policy"] == "3;w=60"
    assert shim.get("/readyz").json()["rate_limits"]["mode"] == "local"
    assert [_place(shim, light).status_code for _ in range(3)] == [202, 202, 429]  # its two left, no more
    now[0] += 20  # a third of the window: one token back for each
    assert [_place(shim, spender).status_code for _ in range(2)] == [202, 429]


def test_payment_webhooks_are_rate_limited_per_client_address(shim_app, private_redis):
    # a Redis of its own: every request here comes from the same address ("testclient")
    shim = shim_app(redis_port=private_redis.port, WEBHOOK_RATE_PER_MINUTE_PER_ADDRESS=3)
    headers = {"Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"}
    answers = [shim.post("/orders/payment-confirmation", content=b"{}", headers=headers) for _ in range(4)]
    assert [r.status_code for r in answers] == [400, 400, 400, 429]  # unsigned: refused, and counted
    assert answers[3].json()["error"] == "rate_limited" and int(answers[3].headers["Retry-After"]) > 0
    assert answers[3].headers["RateLimit-Limit"] == "3"
    assert _metric(shim, 'orders_shim_rate_limited_total{kind="webhook"}') == 1
