"""The Stripe fake's response latency (``--latency-ms``, ``POST /_fake/latency``): PaymentIntent
creates wait, concurrently, and nothing else waits behind them (the benchmarks' provider stand-in)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the fakes live in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from scripts.fakes import fake_stripe  # noqa: E402

LATENCY_S = 1.0
AUTH = {"Authorization": f"Bearer {fake_stripe.DEFAULT_API_KEY}"}


@pytest.fixture
def fake() -> Iterator[Any]:
    server = fake_stripe.serve(0, latency_ms=LATENCY_S * 1000)
    yield server
    server.stop()


def create(url: str, key: str) -> float:
    """Seconds one create+confirm of a card PaymentIntent takes."""
    started = time.monotonic()
    r = httpx.post(
        url + "/v1/payment_intents",
        headers={**AUTH, "Idempotency-Key": key},
        data={"amount": "1200", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["status"] == "succeeded"
    return time.monotonic() - started


def test_creates_wait_the_latency_side_by_side_and_other_calls_do_not_wait(fake: Any) -> None:
    with ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        creates = [pool.submit(create, fake.url, f"order-{i}") for i in range(8)]
        # while the eight creates wait, a read and a control call are answered at once
        with httpx.Client(base_url=fake.url, timeout=10) as client:
            time.sleep(LATENCY_S / 4)
            t = time.monotonic()
            assert client.get("/v1/payment_intents", headers=AUTH).status_code == 200
            assert client.get("/_fake/charges").status_code == 200
            others = time.monotonic() - t
        took = [f.result() for f in creates]
        wall = time.monotonic() - started
    assert all(s >= LATENCY_S for s in took)
    assert others < LATENCY_S / 2
    # served side by side: eight in about one latency, not eight latencies one after another
    assert wall < 3 * LATENCY_S


def test_latency_changes_at_run_time_and_zero_answers_at_once(fake: Any) -> None:
    assert httpx.get(fake.url + "/_fake/latency").json() == {"ms": LATENCY_S * 1000}
    assert httpx.post(fake.url + "/_fake/latency", json={"ms": 0}).json() == {"ms": 0}
    assert create(fake.url, "order-fast") < LATENCY_S / 2
    assert httpx.post(fake.url + "/_fake/latency", json={"ms": -1}).status_code == 400
    assert httpx.post(fake.url + "/_fake/latency", json={"ms": "soon"}).status_code == 400
