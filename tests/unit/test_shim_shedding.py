"""Load shedding at the shim's edge and the in-process fallback limiter, without servers.

The edge middleware is driven as plain ASGI, with an inner app that holds
its request until the test lets go, so "in flight" is exact.  The fallback
limiter runs on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from worker.redis_gate import RedisBusy
from worker.shim.app import EdgeMiddleware
from worker.shim.metrics import ShimMetrics
from worker.shim.orders import _settled_view
from worker.shim.ratelimit import LOCAL_MAX_BUCKETS, LocalLimiter


async def _call(app: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


async def _entered(inside: list[str], n: int) -> None:
    while len(inside) < n:
        await asyncio.sleep(0)


def test_requests_beyond_the_concurrency_limit_are_shed_with_503_and_retry_after_but_probes_are_not() -> None:
    async def scenario() -> None:
        release, inside = asyncio.Event(), []

        async def held(scope: Any, receive: Any, send: Any) -> None:
            inside.append(scope["path"])
            await release.wait()
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        metrics = ShimMetrics()
        edge = EdgeMiddleware(held, max_body=1024, body_timeout=10, metrics=metrics, max_concurrent=2)
        busy = [asyncio.create_task(_call(edge, "/orders")) for _ in range(2)]
        probe = asyncio.create_task(_call(edge, "/readyz"))
        await asyncio.wait_for(_entered(inside, 3), 5)
        # a third order while two are in flight (bounded: without shedding it would wait for ever)
        status, headers, body = await asyncio.wait_for(_call(edge, "/orders"), 5)
        assert (status, headers["retry-after"], json.loads(body)["error"]) == (503, "1", "overloaded")
        release.set()
        assert [s for s, _, _ in await asyncio.gather(*busy, probe)] == [202, 202, 202]
        assert (await _call(edge, "/orders"))[0] == 202  # room again once they finished
        assert metrics.shed.labels("concurrency")._value.get() == 1

    asyncio.run(scenario())


def test_fallback_limiter_allows_each_process_its_share_as_a_token_bucket() -> None:
    now = [0.0]
    limiter = LocalLimiter({"place": (30, 1000)}, processes=3, clock=lambda: now[0])  # share: 10 per user
    decisions = [limiter.check("place", "ann", "10.0.0.1") for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert (decisions[0].limit, decisions[0].remaining, decisions[-1].reset_seconds) == (10, 9, 6)
    assert limiter.check("place", "bob", "10.0.0.1").allowed  # another user has a bucket of its own
    now[0] += 30  # half a window: half the share back
    assert [limiter.check("place", "ann", "10.0.0.1").allowed for _ in range(6)] == [True] * 5 + [False]


def test_fallback_limiter_refuses_when_the_address_share_is_spent_and_takes_from_neither() -> None:
    limiter = LocalLimiter({"read": (2, 4)}, processes=2, clock=lambda: 0.0)  # shares: 1 per user, 2 per address
    assert [limiter.check("read", user, "10.0.0.9").allowed for user in ("a", "b", "c")] == [True, True, False]
    refused = limiter.check("read", "c", "10.0.0.9")
    assert not refused.allowed and refused.limit == 2 and refused.reset_seconds == 30
    assert limiter.check("read", "c", "10.0.0.8").allowed  # the refusals did not spend c's only token


def test_fallback_limiter_starts_each_bucket_from_what_redis_last_said_was_left() -> None:
    now = [0.0]
    limiter = LocalLimiter({"place": (40, 1000)}, processes=4, clock=lambda: now[0])  # shares: 10, 250
    limiter.remember("place", "spent", "10.0.0.1", [40, 40])  # its whole limit used in Redis
    limiter.remember("place", "half", "10.0.0.2", [20, 20])  # half of it
    assert not limiter.check("place", "spent", "10.0.0.1").allowed  # no fresh share when Redis goes away
    assert [limiter.check("place", "half", "10.0.0.2").allowed for _ in range(6)] == [True] * 5 + [False]
    assert [limiter.check("place", "new", "10.0.0.3").allowed for _ in range(11)] == [True] * 10 + [False]
    now[0] += 6  # one token of a share of 10 a minute: the spent client has one again
    assert [limiter.check("place", "spent", "10.0.0.1").allowed for _ in range(2)] == [True, False]


def test_fallback_limiter_counts_the_address_alone_where_callers_have_no_user() -> None:
    limiter = LocalLimiter({"webhook": (None, 2)}, processes=1, clock=lambda: 0.0)
    assert [limiter.check("webhook", None, "10.0.0.1").allowed for _ in range(3)] == [True, True, False]
    assert limiter.check("webhook", None, "10.0.0.2").allowed
    assert set(limiter._buckets) == {"webhook:a:10.0.0.1", "webhook:a:10.0.0.2"}


def test_fallback_limiter_keeps_at_most_its_bucket_bound() -> None:
    limiter = LocalLimiter({"read": (10, 10)}, processes=1, clock=lambda: 0.0)
    for i in range(LOCAL_MAX_BUCKETS // 2 + 10):
        limiter.check("read", f"u{i}", f"a{i}")
    assert len(limiter._buckets) == LOCAL_MAX_BUCKETS


def test_waiting_for_a_published_order_ends_without_a_503_when_the_redis_pool_is_exhausted() -> None:
    views = iter([{"status": "pending"}])

    class Cache:
        async def get(self, _order_id: str) -> Any:
            view = next(views, None)
            if view is None:
                raise RedisBusy("all 1 Redis connections in use")
            return view

    class Shim:
        cache = Cache()

    async def wait() -> Any:
        return await _settled_view(Shim(), "o-1", time.monotonic() + 5, lambda v: v["status"] != "pending")  # type: ignore[arg-type]

    # the command is out: the caller gets 202 pending (a 503 would invite a duplicate order)
    assert asyncio.run(wait()) == {"status": "pending"}
