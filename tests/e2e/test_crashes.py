"""Kills and stops: nothing lost, nothing applied twice, no event under two ids."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import pika
from sqlalchemy import text


def count(engine: Any, sql: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar_one()


def publish_stream(bus: Any, bodies: list[tuple[str, dict[str, Any], str]], pause_every: int = 0) -> threading.Thread:
    """Publish (type, body, message_id) from a thread on its own connection."""

    def run() -> None:
        conn = pika.BlockingConnection(pika.URLParameters(bus.url))
        ch = conn.channel()
        ch.confirm_delivery()
        keys = {"PlaceOrder": "order.place", "CancelOrder": "order.cancel", "PaymentConfirmed": "payment.confirmed"}
        for n, (kind, body, mid) in enumerate(bodies):
            ch.basic_publish(
                "orders.commands",
                keys[kind],
                json.dumps(body).encode(),
                pika.BasicProperties(message_id=mid, type=kind, content_type="application/json", delivery_mode=2),
            )
            if pause_every and n % pause_every == 0:
                time.sleep(0.01)
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def check_events(bus: Any, engine: Any) -> dict[str, Counter[str]]:
    """Every event id has one body; per order, the distinct events by routing key."""
    bodies: dict[str, str] = {}
    per_order: dict[str, Counter[str]] = defaultdict(Counter)
    for e in bus.events():
        body = json.dumps(e["body"], sort_keys=True)
        assert e["message_id"] == e["body"]["event_id"]
        if e["message_id"] in bodies:
            assert bodies[e["message_id"]] == body, "one event id with two bodies"
            continue
        bodies[e["message_id"]] = body
        per_order[e["body"]["order_id"]][e["routing_key"]] += 1
    return per_order


def test_worker_killed_with_sigkill_during_a_stream_applies_every_command_once(
    service, bus, clean_db, wait, make_place, commands_only
):
    total = 2000
    commands = [
        ("PlaceOrder", make_place(user=f"u{n % 17}", order_id=str(uuid.uuid4())), f"place-{n}") for n in range(total)
    ]
    pool = service("worker", "--processes", "2", *commands_only)
    service("relay")
    wait(lambda: len(pool.children()) == 2, what="two worker processes")
    stream = publish_stream(bus, commands + commands[:300], pause_every=50)  # 300 duplicates too
    kills = 0
    rng = random.Random(7)
    while count(clean_db, "SELECT count(*) FROM orders") < total and kills < 6:
        time.sleep(rng.uniform(0.2, 0.6))
        victims = pool.children()
        if victims:
            os.kill(rng.choice(victims), signal.SIGKILL)
            kills += 1
    stream.join(60)
    assert kills >= 3, "the stream ended before the worker could be killed"
    wait(lambda: count(clean_db, "SELECT count(*) FROM orders") == total, timeout=90, what="all orders")
    wait(lambda: bus.depth("orders.place") == 0, timeout=60, what="queue drained")
    wait(lambda: count(clean_db, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0, timeout=60)
    assert count(clean_db, "SELECT count(*) FROM inbox WHERE consumer = 'orders'") == total
    assert count(clean_db, "SELECT count(*) FROM outbox") == 0  # deleted once confirmed
    assert count(clean_db, "SELECT count(*) FROM order_transitions") == total
    per_order = wait(lambda: (lambda p: p if len(p) == total else None)(check_events(bus, clean_db)), timeout=60)
    assert all(c == Counter({"stock.reserve": 1, "order.placed": 1}) for c in per_order.values())
    wait(lambda: len(pool.children()) == 2, what="the supervisor brought the killed processes back")
    assert [(d["message_id"], d["headers"].get("x-error-message")) for d in bus.dead_letters()] == []


def test_relay_killed_mid_batch_publishes_everything_under_stable_ids(
    service, bus, clean_db, wait, make_place, commands_only
):
    total = 3000
    service("worker", "--processes", "2", *commands_only)
    for n in range(total):
        bus.publish("PlaceOrder", make_place(order_id=str(uuid.uuid4())), message_id=f"r-{n}")
    wait(lambda: count(clean_db, "SELECT count(*) FROM orders") == total, timeout=90, what="orders applied")
    relay = service("relay", ORDERS_RELAY__BATCH_SIZE="200")
    wait(lambda: count(clean_db, "SELECT count(*) FROM outbox") < 3 * total, timeout=30)
    relay.kill_group()  # SIGKILL while batches are in flight
    published_before = 3 * total - count(clean_db, "SELECT count(*) FROM outbox")
    assert published_before < 3 * total, "the relay finished before it could be killed"
    service("relay")
    wait(lambda: count(clean_db, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0, timeout=60)
    per_order = wait(lambda: (lambda p: p if len(p) == total else None)(check_events(bus, clean_db)), timeout=60)
    assert all(c == Counter({"stock.reserve": 1, "order.placed": 1}) for c in per_order.values())
    # republished only what had not been confirmed and marked: at most one batch arrives twice
    deliveries = len(bus.events())
    assert 2 * total <= deliveries <= 2 * total + 200


def test_a_standby_relay_takes_over_when_the_active_one_dies(service, bus, clean_db, wait, make_place, commands_only):
    service("worker", "--processes", "1", *commands_only)
    first = service("relay")
    second = service("relay")
    bus.publish("PlaceOrder", make_place(order_id=str(uuid.uuid4())))
    wait(lambda: len(bus.events()) >= 2, what="events from the active relay")
    active, standby = (first, second) if "relay active" in first.log.read_text() else (second, first)
    assert "standing by" in standby.log.read_text()
    active.kill_group()
    order_id = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=order_id))
    wait(lambda: any(e["body"]["order_id"] == order_id for e in bus.events()), timeout=30, what="standby took over")
    assert "relay active" in standby.log.read_text()


def test_sigterm_during_a_stream_loses_and_duplicates_nothing(service, bus, clean_db, wait, make_place, commands_only):
    total = 1500
    commands = [("PlaceOrder", make_place(order_id=str(uuid.uuid4())), f"t-{n}") for n in range(total)]
    pool = service("worker", "--processes", "2", *commands_only, ORDERS_WORKER__BATCH_SIZE="50")
    service("relay")
    stream = publish_stream(bus, commands, pause_every=20)
    wait(lambda: count(clean_db, "SELECT count(*) FROM orders") > 200, what="work under way")
    started = time.monotonic()
    assert pool.stop(timeout=30) == 0, "the pool exits cleanly on SIGTERM"
    assert time.monotonic() - started < 20
    stream.join(60)
    applied = count(clean_db, "SELECT count(*) FROM orders")
    assert applied < total, "the pool finished before SIGTERM"
    wait(lambda: bus.depth("orders.place") == total - applied, timeout=10, what="every unapplied command still queued")
    service("worker", "--processes", "2", *commands_only)
    wait(lambda: count(clean_db, "SELECT count(*) FROM orders") == total, timeout=60)
    wait(lambda: bus.depth("orders.place") == 0)
    assert count(clean_db, "SELECT count(*) FROM inbox WHERE consumer = 'orders'") == total
    wait(lambda: count(clean_db, "SELECT count(*) FROM outbox") == 0, timeout=60)
    per_order = wait(lambda: (lambda p: p if len(p) == total else None)(check_events(bus, clean_db)), timeout=60)
    assert all(c == Counter({"stock.reserve": 1, "order.placed": 1}) for c in per_order.values())
