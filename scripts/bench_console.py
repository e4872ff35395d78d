"""Benchmark the console's pages with 10,000 dead letters and 100,000 orders.

Makes a database and a RabbitMQ vhost of its own (``orders_bench_console``,
``orders-bench-console``, both made anew and removed at the end), loads
100,000 orders with their items, transitions, history, payments and inbox
rows (a third of them in the last hour, so the glance page's per-minute
figures have an hour of work to count), and publishes 10,000 dead letters
in five groups to ``orders.dead-letter``.  Then it reads the queue into the
dead-letter index once (timed: how long the queue is held and the index
written), starts the real ``orders shim``, signs in through a one-time link
and asks each page ``--repeat`` times, one request at a time, printing the
median, the 95th percentile and the worst time of each.  Last, it times one
replay preview of the largest group (an action: it reads the live queue).

    .venv/bin/python scripts/bench_console.py [--orders 100000] [--dead-letters 10000] [--repeat 30]

Uses the configured servers (``ORDERS_*`` overrides apply).  Times are wall
clock on the machine it runs on, client included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pika
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts import harness  # noqa: E402
from scripts.harness import Proc  # noqa: E402
from scripts.tcp_proxy import free_port  # noqa: E402

DBNAME = "orders_bench_console"
VHOST = "orders-bench-console"
#: (error class, message with a varying part, original queue, type, share of the dead letters)
GROUPS = [
    ("CatalogueDown", "catalogue unreachable for order {oid} after {n} tries", "orders.place", "PlaceOrder", 0.6),
    ("RetryLater", "order {oid} is not placed yet", "orders.cancel", "CancelOrder", 0.25),
    ("InvalidMessage", "body is not valid JSON at char {n}", "orders.place", "PlaceOrder", 0.1),
    ("ProviderTimeout", "stripe timed out after {n} s for pi_{oid8}", "orders.payments", "StartPayment", 0.04),
    ("Boom", "it broke again (order {oid})", "orders.place", "PlaceOrder", 0.01),
]


def load_orders(engine: Any, count: int) -> list[tuple[str, str]]:
    """``count`` orders, a third placed in the last hour; returns (order id, user id) of a few."""
    statements = [
        "INSERT INTO products (product_id, name, price, currency) VALUES ('sku-bench', 'Bench', 150, 'USD')",
        # one order per second going back in time: the newest third falls in the last hour
        "INSERT INTO orders (order_id, user_id, status, currency, total, payment_provider, payment_request,"
        " place_message_id, created_at, updated_at)"
        " SELECT md5('o' || i)::uuid, 'user-' || (i % 5000), (ARRAY['completed','completed','shipped','pending',"
        "'awaiting_payment','cancelled','rejected'])[1 + i % 7], 'USD', 150, CASE WHEN i % 3 = 0 THEN 'paypal'"
        ' ELSE \'stripe\' END, \'{"provider": "stripe", "payment_method": "pm_card_visa"}\', \'m-\' || i,'
        " now() - make_interval(secs => i * 10800.0 / :n), now() - make_interval(secs => i * 10800.0 / :n)"
        " FROM generate_series(1, :n) AS i",
        "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price)"
        " SELECT order_id, 1, 'sku-bench', 1, 150 FROM orders",
        "INSERT INTO order_transitions (order_id, from_status, to_status, message_id, message_type, at, events)"
        " SELECT order_id, NULL, 'pending', place_message_id, 'PlaceOrder', created_at,"
        ' \'[["orders.events", "order.placed", "e"]]\' FROM orders',
        "INSERT INTO order_transitions (order_id, from_status, to_status, message_id, message_type, at)"
        " SELECT order_id, 'pending', status, 'pay-' || place_message_id, 'StartPayment',"
        " created_at + interval '1 second' FROM orders WHERE status <> 'pending'",
        "INSERT INTO payments (order_id, provider, status, amount, currency, idempotency_key,"
        " provider_payment_id, attempts, created_at, updated_at)"
        " SELECT order_id, payment_provider, CASE WHEN status = 'rejected' THEN 'declined' ELSE 'succeeded' END,"
        " 150, 'USD', 'pay-' || order_id, 'pi_' || substr(md5(order_id::text), 1, 20), 1, created_at, updated_at"
        " FROM orders",
        "INSERT INTO order_history (order_id, kind, ref, message_id, message_type, data, at)"
        " SELECT order_id, 'payment', CASE WHEN status = 'rejected' THEN 'declined' ELSE 'succeeded' END,"
        " 'pay-' || place_message_id, 'StartPayment', jsonb_build_object('provider', payment_provider,"
        " 'status', CASE WHEN status = 'rejected' THEN 'declined' ELSE 'succeeded' END), created_at"
        " FROM orders",
        "INSERT INTO order_history (order_id, kind, message_id, message_type, data, at)"
        " SELECT order_id, 'event', 'c-' || place_message_id, 'CancelOrder', jsonb_build_object('events',"
        " '[]'::jsonb, 'refused', jsonb_build_object('command', 'CancelOrder', 'reason', 'not_cancellable'))"
        ", created_at + interval '2 seconds' FROM orders WHERE status = 'shipped'",
        "INSERT INTO inbox (consumer, message_id, processed_at) SELECT 'orders', place_message_id, created_at"
        " FROM orders",
        "INSERT INTO inbox (consumer, message_id, processed_at) SELECT 'payments', 'pay-' || place_message_id,"
        " created_at FROM orders",
    ]
    with engine.begin() as conn:
        for sql in statements:
            conn.execute(text(sql), {"n": count})
        sample = conn.execute(text("SELECT order_id::text, user_id FROM orders ORDER BY created_at DESC LIMIT 20"))
        found = [(r[0], r[1]) for r in sample]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))  # the steady state autovacuum keeps a live database in
    return found


def publish_dead_letters(url: str, count: int, orders: list[tuple[str, str]]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_purge("orders.dead-letter")
    now = datetime.now(UTC)
    made = 0
    for error, message, queue, kind, share in GROUPS:
        for i in range(max(1, int(count * share))):
            if made >= count:
                break
            oid = orders[i % len(orders)][0] if i % 4 == 0 else str(uuid.uuid4())
            at = (now - timedelta(seconds=(count - made) * 3600 / count)).isoformat()
            body = {
                "order_id": oid,
                "user_id": "alice",
                "items": [{"product_id": "sku-bench", "quantity": 1 + i % 3}],
                "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
            }
            headers: dict[str, Any] = {
                "x-original-exchange": "orders.commands",
                "x-original-routing-key": "order.place",
                "x-original-queue": queue,
                "x-first-failure-at": at,
                "x-last-failure-at": at,
                "x-attempts": 5,
                "x-error-class": error,
                "x-error-message": message.format(oid=oid, oid8=oid[:8], n=i % 97),
                "x-error-digest": f"{hash(error) & 0xFFFFFFFF:08x}",
                "x-error-traceback": "Traceback (most recent call last):\n" + "  File ...\n" * 12 + error,
            }
            if error == "Boom":
                headers["x-replay-count"] = 1
            ch.basic_publish(
                "orders.dlx",
                queue,
                json.dumps(body).encode(),
                pika.BasicProperties(
                    message_id=f"dl-{made}",
                    type=kind,
                    content_type="application/json",
                    delivery_mode=2,
                    headers=headers,
                ),
            )
            made += 1
    conn.close()


def cpu_ms(pids: list[int]) -> float:
    """CPU time (user + system) the processes used so far, in ms (Linux: /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total * 1000 / os.sysconf("SC_CLK_TCK")


def backends(engine: Any) -> list[int]:
    """The PostgreSQL server processes of the benchmark's database (the shim's pooled connections)."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            ).scalars()
        )


def timed(client: httpx.Client, path: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        r = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"{path}: {r.status_code} {r.text[:300]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--dead-letters", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--keep", action="store_true", help="Leave the database and vhost (and say where).")
    args = parser.parse_args()

    from worker import db
    from worker.settings import load_settings

    start_load = os.getloadavg()
    os.environ["ORDERS_ENVIRONMENT"] = "development"
    os.environ["ORDERS_DATABASE__DBNAME"] = DBNAME
    base = load_settings()
    try:  # never the default vhost: the run purges its dead-letter queue
        harness.create_vhost(VHOST, fresh=True)
    except harness.HarnessError as exc:
        raise SystemExit(f"bench_console: a vhost of its own is needed ({exc})") from None
    vhost = VHOST
    url = harness.vhost_url(base.rabbitmq.url.get_secret_value(), vhost)
    os.environ["ORDERS_RABBITMQ__URL"] = url
    settings = load_settings()
    harness.fresh_database(settings.database)
    engine = db.make_engine(settings.database, pool_size=2)
    shim: Proc | None = None
    try:
        from worker.rabbit.connection import BlockingBroker
        from worker.rabbit.topology import declare_topology

        broker = BlockingBroker(url).connect()
        declare_topology(broker.channel(), settings.worker.retry_delays_seconds)
        broker.close()

        t = time.perf_counter()
        sample = load_orders(engine, args.orders)
        print(f"loaded {args.orders:,} orders in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        publish_dead_letters(url, args.dead_letters, sample)
        print(f"published {args.dead_letters:,} dead letters in {time.perf_counter() - t:.1f} s")

        from worker.dlq.operations import refresh_index

        reads = []
        for _ in range(3):
            t = time.perf_counter()
            state = refresh_index(settings, engine, force=True)
            reads.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        refresh_index(settings, engine)  # unchanged: a passive declare only
        unchanged = (time.perf_counter() - t) * 1000
        print(
            f"index: {state.depth:,} messages; queue held {state.duration_ms} ms; whole refresh "
            f"{statistics.median(reads):.0f} ms (median of 3, queue read and index written); "
            f"unchanged queue: {unchanged:.1f} ms"
        )

        port = free_port()
        env = {**os.environ, "ORDERS_SHIM__PORT": str(port), "ORDERS_LOGGING__LEVEL": "WARNING"}
        log = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_console_shim.log"
        shim = Proc.orders(["shim"], env, log)
        base_url = f"http://127.0.0.1:{port}"
        harness.wait_until(lambda: _answers(base_url), 60, what="the shim")

        from worker.shim.console.session import create_login

        token = create_login(engine, "bench", 60)
        client = httpx.Client(base_url=base_url, timeout=60)
        client.post("/console/login", data={"token": token})
        groups_page = client.get("/console/dead-letters").text
        csrf = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', groups_page).group(1)  # type: ignore[union-attr]
        with engine.connect() as conn:
            largest = conn.execute(
                text("SELECT group_key FROM dead_letter_index GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")
            ).scalar_one()
            total = conn.execute(text("SELECT count(*) FROM dead_letter_index WHERE group_key = :k"), {"k": largest})
            last_page = -(-total.scalar_one() // 50)
        order_id, user = sample[0]
        pages = {
            "at a glance (/console)": "/console",
            "glance refresh (/console/glance)": "/console/glance",
            "dead-letter groups": "/console/dead-letters",
            "largest group, first page": f"/console/dead-letters/groups/{largest}",
            "largest group, last page": f"/console/dead-letters/groups/{largest}?page_no={last_page}",
            "one dead letter (with order facts)": "/console/dead-letters/messages/dl-0",
            "audit trail": "/console/dead-letters/audit",
            "find orders of a user": f"/console/orders?q={user}",
            "an order's story": f"/console/orders/{order_id}",
        }
        for path in pages.values():  # warm up: the first requests import, connect and fill the pool
            client.get(path)
        print(f"\npages, {args.repeat} requests each, one at a time (wall ms; CPU ms per request of the shim and")
        print("of PostgreSQL's backends, which a busy machine does not inflate the way it does wall time):")
        print(f"{'page':40} {'median':>8} {'p95':>8} {'max':>8} {'shim CPU':>9} {'PG CPU':>8}")
        worst = 0.0
        for name, path in pages.items():
            shim_before, pids = cpu_ms([shim.pid]), backends(engine)
            pg_before = cpu_ms(pids)
            times = sorted(timed(client, path, args.repeat))
            shim_cpu = (cpu_ms([shim.pid]) - shim_before) / args.repeat
            pg_cpu = (cpu_ms(pids) - pg_before) / args.repeat
            p95 = times[max(0, int(len(times) * 0.95) - 1)]
            worst = max(worst, p95)
            print(
                f"{name:40} {statistics.median(times):8.1f} {p95:8.1f} {times[-1]:8.1f} {shim_cpu:9.1f} {pg_cpu:8.1f}"
            )
        t = time.perf_counter()
        r = client.post(
            "/console/dead-letters/preview", data={"csrf_token": csrf, "action": "replay", "group": largest}
        )
        preview_ms = (time.perf_counter() - t) * 1000
        found = re.search(r"would replay ([0-9,]+) message", r.text)
        print(
            f"\nreplay preview of the largest group ({found.group(1) if found else '?'} messages; reads the live "
            f"queue, re-indexes it, order facts of the first 50): {preview_ms:.0f} ms"
        )
        print(f"\nslowest page p95: {worst:.1f} ms ({'under' if worst < 300 else 'OVER'} 300 ms)")
        print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}, {os.cpu_count()} CPUs")
        print(f"load average at the start: {start_load}")
    finally:
        if shim is not None:
            shim.stop()
        engine.dispose()
        if args.keep:
            print(f"kept database {DBNAME} and vhost {vhost or '/'}")
        else:
            harness.drop_database(settings.database)
            harness.delete_vhost(vhost)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
