#!/usr/bin/env python3
"""The Stripe SDK's HTTP client: CPU per PaymentIntent create, by client (a benchmark, not a test).

The payment step makes one ``POST /v1/payment_intents`` (create and confirm)
per card order through ``stripe.StripeClient``; what the SDK does around it
and what its HTTP client does are both in the worker's CPU per paid order.
This times, in this process's own thread (``time.thread_time``: the Stripe
fake's CPU is not counted), ``--requests`` creates against a Stripe fake of
its own (``scripts/fakes/fake_stripe.py``, answering at once), each with its
own idempotency key, through:

- ``requests``: ``stripe.RequestsClient``, the SDK's default (a
  ``requests.Session`` per thread; the environment's proxies and
  ``~/.netrc`` looked up per request);
- ``httpx``: ``stripe.HTTPXClient(allow_sync_methods=True)``;
- ``urllib3``: :class:`handlers.payments.stripe_client.Urllib3Client`, the
  service's (one thread-safe ``urllib3.PoolManager``);
- ``urllib3, raw``: the same client, the create made as the payment step
  made it until 2026-12-07 (``StripeClient.raw_request``, the answer read as
  JSON, not built into a ``StripeObject``); the typed rows read their answer
  as the gateway used to (``to_dict()``);
- ``http.client, raw, quiet``: the service's now,
  :class:`handlers.payments.stripe_client.ThreadConnectionClient` (a kept
  ``http.client`` connection per thread) with the SDK's log lines formatted
  only when the ``stripe`` logger takes them
  (:func:`handlers.payments.stripe_client.quiet_sdk_logging`; the other rows
  run with the SDK's logging as it comes).

in ``--rounds`` rounds, the clients alternating within each round, and prints
each one's median µs of CPU per create and its rounds.

Usage::

    .venv/bin/python scripts/bench_stripe_http.py                    # 5 rounds of 400 creates each
    .venv/bin/python scripts/bench_stripe_http.py --rounds 3 --requests 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import stripe
import stripe._api_requestor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handlers.payments.stripe_client import ThreadConnectionClient, Urllib3Client, quiet_sdk_logging  # noqa: E402
from scripts.bench_paid import start_fake  # noqa: E402
from scripts.benchkit import machine_line  # noqa: E402

API_KEY = "sk_test_local_fake"  # the fake's default key
#: as the payment step sends them (handlers.payments.stripe_gateway.StripeGateway.start)
PARAMS: dict[str, Any] = {
    "amount": 1000,
    "currency": "eur",
    "payment_method": "pm_card_visa",
    "payment_method_types": ["card"],
    "confirm": True,
    "metadata": {"order_id": "00000000-0000-0000-0000-000000000000"},
}


def clients(base: str) -> dict[str, tuple[Callable[[], stripe.HTTPClient], bool, bool]]:
    """Each row's HTTP client, whether the create is a raw request, and whether the SDK's logging is quieted."""
    return {
        "requests": (lambda: stripe.RequestsClient(timeout=10), False, False),
        "httpx": (lambda: stripe.HTTPXClient(timeout=10, allow_sync_methods=True), False, False),
        "urllib3": (lambda: Urllib3Client(base, 10), False, False),
        "urllib3, raw": (lambda: Urllib3Client(base, 10), True, False),
        "http.client, raw, quiet": (lambda: ThreadConnectionClient(base, 10), True, True),
    }


def cpu_per_create(base: str, make: Callable[[], stripe.HTTPClient], raw: bool, quiet: bool, n: int) -> float:
    """µs of this thread's CPU per create, after 50 to warm the connection and the SDK up."""
    requestor: Any = stripe._api_requestor
    as_it_comes = (requestor.log_info, requestor.log_debug)
    if quiet:
        quiet_sdk_logging()
    try:
        return _cpu_per_create(base, make, raw, n)
    finally:
        requestor.log_info, requestor.log_debug = as_it_comes


def _cpu_per_create(base: str, make: Callable[[], stripe.HTTPClient], raw: bool, n: int) -> float:
    client = stripe.StripeClient(API_KEY, base_addresses={"api": base}, max_network_retries=2, http_client=make())

    def create() -> dict[str, Any]:
        key = str(uuid.uuid4())
        if raw:
            return dict(client.raw_request("post", "/v1/payment_intents", **PARAMS, idempotency_key=key).data)
        return client.v1.payment_intents.create(PARAMS, {"idempotency_key": key}).to_dict()  # type: ignore[arg-type]

    for _ in range(50):
        create()
    started = time.thread_time()
    for _ in range(n):
        intent = create()
        if intent["status"] != "succeeded":
            raise SystemExit(f"unexpected intent {intent['id']}: {intent['status']}")
    return (time.thread_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400, help="creates per client per round (400)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stripe-http-") as tmp:
        fake, base = start_fake(0, Path(tmp) / "stripe.log")
        try:
            made = clients(base)
            rounds: dict[str, list[float]] = {name: [] for name in made}
            for r in range(args.rounds):
                order = list(made) if r % 2 == 0 else list(reversed(made))  # who goes first alternates
                for name in order:
                    rounds[name].append(cpu_per_create(base, *made[name], args.requests))
        finally:
            fake.stop()
    print(machine_line())
    print(f"CPU µs per PaymentIntent create through the SDK, this thread only, {args.requests} per round")
    print("| client | median | rounds |")
    print("|---|---:|---|")
    for name, values in rounds.items():
        print(f"| {name} | **{statistics.median(values):.0f}** | {', '.join(f'{v:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
