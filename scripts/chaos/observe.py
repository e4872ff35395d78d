"""Observing the end state: waiting for quiescence (:func:`wait_for_quiescence`), then one
:class:`Snapshot` of PostgreSQL, the captured events, the dead-letter queue, the fakes' records,
``orders audit`` and the Redis read model.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import httpx
import pika
import psycopg2
import redis

from schema.topology import COMMAND_QUEUES, DEAD_LETTER_QUEUE, PAYMENTS_QUEUE, delay_queue
from scripts import harness
from worker.rabbit.connection import connection_parameters

from .config import CAPTURE_QUEUE, ChaosError
from .driver import Buyer, Clerk, Ledger
from .stack import Stack


def queue_states(stack: Stack) -> dict[str, tuple[int, int, int]]:
    """Per queue of the run's vhost: its messages, of them ready, and unacknowledged (rabbitmqctl).

    A quorum queue's ``messages`` also counts what it dead-lettered at least once and its target has not
    confirmed yet (RabbitMQ sends it again after ``dead_letter_worker_publisher_confirm_timeout``, 3
    minutes by default): more ``messages`` than ready and unacknowledged together says that is where they
    are, not in the queue waiting for their TTL."""
    try:
        done = harness.rabbitmqctl(
            "list_queues",
            "-p",
            stack.cfg.vhost,
            "name",
            "messages",
            "messages_ready",
            "messages_unacknowledged",
            "--quiet",
            "--no-table-headers",
        )
    except harness.HarnessError as exc:
        raise ChaosError(str(exc)) from None
    if done.returncode != 0:
        raise ChaosError(f"rabbitmqctl list_queues failed: {done.stderr.strip()[-300:]}")
    return parse_queue_states(done.stdout)


def parse_queue_states(text: str) -> dict[str, tuple[int, int, int]]:
    """``rabbitmqctl list_queues name messages messages_ready messages_unacknowledged``'s lines, by queue."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
    return out


def describe_depth(queue: str, state: tuple[int, int, int]) -> str:
    """``orders.delay.1s: 6 messages``, with where they are when not all of them are ready or delivered."""
    messages, ready, unacked = state
    text = f"{queue}: {messages} messages"
    if messages != ready + unacked or unacked:
        dead_lettered = messages - ready - unacked
        text += f" ({ready} ready, {unacked} unacknowledged, {dead_lettered} dead-lettered awaiting a confirm)"
    return text


def db_counts(dsn: str) -> dict[str, Any]:
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="chaos-check")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT (SELECT count(*) FROM orders),"
                " (SELECT count(*) FROM orders WHERE status = 'pending'),"
                " (SELECT count(*) FROM orders WHERE status = 'awaiting_payment'),"
                " (SELECT count(*) FROM payments WHERE status IN ('started', 'unknown', 'capturing')),"
                " (SELECT count(*) FROM outbox WHERE published_at IS NULL),"
                " (SELECT coalesce(max(id), 0) FROM order_transitions),"
                " (SELECT count(*) FROM inbox),"
                # money the service can give back itself; an internal payment goes to an operator
                " (SELECT count(*) FROM payments WHERE status = 'succeeded' AND provider IN ('stripe', 'paypal')"
                "   AND order_id IN"
                "   (SELECT order_id FROM orders WHERE status IN ('cancelled', 'rejected', 'expired')))"
            )
            row = cur.fetchone()
    finally:
        conn.close()
    keys = (
        "orders",
        "pending",
        "awaiting_payment",
        "payments_unsettled",
        "outbox",
        "last_transition",
        "inbox",
        "refund_due",
    )
    return dict(zip(keys, row))


def awaiting_ids(dsn: str) -> list[str]:
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="chaos-check")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT order_id::text FROM orders WHERE status = 'awaiting_payment'")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def unsettled_sample(dsn: str) -> str:
    """A few payments that keep the run from going quiet, for the error message."""
    try:
        conn = psycopg2.connect(dsn, connect_timeout=5, application_name="chaos-check")
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT p.order_id::text, p.provider, p.status, o.status, p.updated_at::text"
                    " FROM payments p JOIN orders o USING (order_id)"
                    " WHERE p.status IN ('started', 'unknown', 'capturing') LIMIT 5"
                )
                rows = cur.fetchall()
        finally:
            conn.close()
    except psycopg2.Error:
        return ""
    return "".join(f"\n  payment of order {r[0]} ({r[1]}): {r[2]}, order {r[3]}, since {r[4]}" for r in rows)


def wait_for_quiescence(
    stack: Stack, ledger: Ledger, buyer: Buyer, timeout: float, clerk: Clerk | None = None
) -> dict[str, Any]:
    """Until queues, outbox and payments are empty and nothing changes; ChaosError at the deadline."""
    deadline = time.monotonic() + timeout
    work_queues = [*COMMAND_QUEUES, PAYMENTS_QUEUE, *(delay_queue(s) for s in stack.cfg.retry_delays)]
    last, stable, started = None, 0, time.monotonic()
    reasons: list[str] = []
    while True:
        reasons = []
        try:
            counts = db_counts(stack.direct_dsn())
            states = queue_states(stack)
        except (psycopg2.Error, ChaosError) as exc:
            counts, states = {}, {}
            reasons.append(f"cannot observe: {exc}")
        if counts:
            with buyer.lock:
                handled = set(buyer.handled)
            waiting = set(awaiting_ids(stack.direct_dsn())) if counts["awaiting_payment"] else set()
            if counts["orders"] < len(ledger.placed):
                reasons.append(f"{len(ledger.placed) - counts['orders']} accepted orders not in PostgreSQL")
            for key in ("pending", "payments_unsettled", "outbox", "refund_due"):
                if counts[key]:
                    reasons.append(f"{counts[key]} {key.replace('_', ' ')}")
            if waiting - handled or not buyer.idle:
                reasons.append(f"{len(waiting - handled)} orders awaiting a buyer (or their expiry)")
            if clerk is not None and not clerk.idle:
                reasons.append("refunds at the provider still to make")
        for q in work_queues:
            if states.get(q, (0, 0, 0))[0]:
                reasons.append(describe_depth(q, states[q]))
        if not reasons:
            snapshot = (counts["last_transition"], counts["inbox"], counts["orders"])
            stable = stable + 1 if snapshot == last else 0
            last = snapshot
            if stable >= 2:
                return {"seconds": time.monotonic() - started, **counts}
        else:
            stable, last = 0, None
        if time.monotonic() > deadline:
            raise ChaosError(
                f"no quiescence within {timeout:.0f}s: "
                + "; ".join(reasons or ["still changing"])
                + unsettled_sample(stack.direct_dsn())
            )
        time.sleep(1.5)


@dataclass
class Snapshot:
    orders: dict[str, dict[str, Any]]
    transitions: dict[str, list[dict[str, Any]]]
    payments: dict[str, dict[str, Any]]
    inbox: dict[str, set[str]]
    items: dict[str, list[tuple[str, int]]]
    events: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    stripe: dict[str, Any]
    paypal: dict[str, Any]
    audit: dict[str, Any]
    read_model: dict[str, str]
    tables: list[str]


def capture_events(url: str) -> list[dict[str, Any]]:
    """Everything on the capture queue, in arrival order (consumed: the run is over)."""
    conn = pika.BlockingConnection(connection_parameters(url, 60))
    ch = conn.channel()
    expected = harness.queue_depth(ch, CAPTURE_QUEUE)
    ch.basic_qos(prefetch_count=2000)
    events: list[dict[str, Any]] = []
    last = [0]

    def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
        events.append(
            {
                "routing_key": method.routing_key,
                "exchange": method.exchange,
                "message_id": props.message_id,
                "raw": body,
            }
        )
        last[0] = method.delivery_tag
        if len(events) % 1000 == 0:
            ch.basic_ack(last[0], multiple=True)

    ch.basic_consume(CAPTURE_QUEUE, on_message)
    quiet = time.monotonic()
    while len(events) < expected or time.monotonic() - quiet < 1.0:
        n = len(events)
        conn.process_data_events(time_limit=0.2)
        if len(events) != n:
            quiet = time.monotonic()
        elif time.monotonic() - quiet > 10:
            break
    if last[0]:
        ch.basic_ack(last[0], multiple=True)
    conn.close()
    for e in events:
        try:
            e["body"] = json.loads(e["raw"])
        except ValueError:
            e["body"] = None
    return events


def read_dead_letters(url: str) -> list[dict[str, Any]]:
    """The dead-letter queue's messages, left in place (not acknowledged)."""
    conn = pika.BlockingConnection(connection_parameters(url, 60))
    ch = conn.channel()
    expected = harness.queue_depth(ch, DEAD_LETTER_QUEUE)
    ch.basic_qos(prefetch_count=min(65535, expected + 100))
    found: list[dict[str, Any]] = []

    def on_message(_ch: Any, _method: Any, props: Any, body: bytes) -> None:
        try:
            order_id = json.loads(body).get("order_id")
        except (ValueError, AttributeError):
            order_id = None
        found.append(
            {
                "message_id": props.message_id,
                "type": props.type,
                "headers": dict(props.headers or {}),
                "size": len(body),
                "order_id": order_id,
            }
        )

    ch.basic_consume(DEAD_LETTER_QUEUE, on_message)
    started = time.monotonic()
    while len(found) < expected and time.monotonic() - started < 30:
        conn.process_data_events(time_limit=0.2)
    conn.close()  # unacknowledged: they stay in the queue for the operator
    return found


def snapshot(stack: Stack) -> Snapshot:
    dsn = stack.direct_dsn()
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="chaos-check")
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT order_id::text, status, user_id, total, currency, payment_provider, place_message_id,"
            " reason FROM orders"
        )
        orders = {
            r[0]: dict(
                zip(("order_id", "status", "user_id", "total", "currency", "provider", "place_mid", "reason"), r)
            )
            for r in cur.fetchall()
        }
        cur.execute("SELECT order_id::text, from_status, to_status, message_id, id FROM order_transitions ORDER BY id")
        transitions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in cur.fetchall():
            transitions[r[0]].append({"from": r[1], "to": r[2], "message_id": r[3], "id": r[4]})
        cur.execute(
            "SELECT order_id::text, provider, status, amount, currency, provider_payment_id, capture_id,"
            " refund_id, confirmed_event_id, last_error, amount_refunded FROM payments"
        )
        payments = {
            r[0]: dict(
                zip(
                    (
                        "order_id",
                        "provider",
                        "status",
                        "amount",
                        "currency",
                        "pid",
                        "capture_id",
                        "refund_id",
                        "confirmed_event_id",
                        "last_error",
                        "amount_refunded",
                    ),
                    r,
                )
            )
            for r in cur.fetchall()
        }
        cur.execute("SELECT consumer, message_id FROM inbox")
        inbox: dict[str, set[str]] = defaultdict(set)
        for consumer, mid in cur.fetchall():
            inbox[consumer].add(mid)
        cur.execute("SELECT order_id::text, product_id, quantity FROM order_items ORDER BY order_id, line_no")
        items: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for oid, pid, q in cur.fetchall():
            items[oid].append((pid, q))
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = sorted(r[0] for r in cur.fetchall())
    finally:
        conn.close()
    url = stack.amqp_url()
    audit_run = stack.cli("audit", "--json", "--stuck-minutes", "0", check=False)
    try:
        audit = json.loads(audit_run.stdout)
    except ValueError:
        audit = {"ok": False, "findings": [], "error": (audit_run.stderr or audit_run.stdout)[-1000:]}
    stripe = httpx.get(stack.fake_urls["stripe"] + "/_fake/charges", timeout=30).json()
    paypal = httpx.get(stack.fake_urls["paypal"] + "/_fake/charges", timeout=30).json()
    read_model: dict[str, str] = {}
    client = redis.Redis(port=stack.redis_port, socket_timeout=5)
    for key in client.scan_iter("orders:view:*", count=1000):
        view = client.hget(key, "view")
        if view is not None:
            read_model[key.decode().rsplit(":", 1)[-1]] = json.loads(view).get("status")
    return Snapshot(
        orders,
        transitions,
        payments,
        inbox,
        items,
        capture_events(url),
        read_dead_letters(url),
        stripe,
        paypal,
        audit,
        read_model,
        tables,
    )
