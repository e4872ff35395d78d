#!/usr/bin/env python3
"""Drain benchmark of the worker pool (a benchmark, not a test).

Preloads N PlaceOrder commands into ``orders.commands``/``order.place``,
starts ``orders relay`` and ``orders worker --processes P`` and measures the
steady drain rate: the time from 10 % to 90 % of the N orders committed.
A baseline runs the same inserts as one plain psycopg2 transaction per order
(4 processes) against the same tables, measured the same way; pgbench with a
custom script runs too when it is installed.

Isolation: its own database ``orders_bench`` (dropped and re-created) and its
own RabbitMQ vhost ``orders-bench`` (``/`` when rabbitmqctl is missing).
Events are consumed by a capture queue bound to ``inventory`` and
``orders.events`` (as the Inventory Service would), counted in a thread.

CPU per order: over the same 10 %→90 % window as the rate, µs of CPU per
drained order for each component (scripts/benchkit.py, from ``/proc``): the
worker processes, the relay, the RabbitMQ node serving the AMQP port, the
PostgreSQL backends of the benchmark's database (its own poller left out) and
the server's WAL writer and checkpointer, and their total; the benchmark
process itself and the rest of the machine (the neighbours, on a shared one)
are shown apart.

``--peer dramatiq`` drains the same number of orders with the Dramatiq peer
(``scripts/peers/peer_dramatiq.py``: the shared peers' order transaction, 2
processes x 8 threads, no event relay; database ``orders_bench_peer``, vhost
``orders-bench-peer``) in alternating rounds with ours (``--rounds``; who goes
first alternates: ours-peer, peer-ours, ...), and prints each side's median,
their ratio and the median CPU per order of each.  It needs Dramatiq 2:
``.venv/bin/pip install -e '.[bench]'``.

Every process it starts is stopped on exit, on errors and on Ctrl-C; a run
gives up with a message after ``--timeout`` seconds (default 600) per drain.

Settings of the service under test come from the environment as usual
(``ORDERS_WORKER__BATCH_SIZE=500 scripts/bench_drain.py``); the script sets
only the database name, the vhost, the log level and the liveness file.

Usage::

    .venv/bin/python scripts/bench_drain.py --orders 20000 --processes 2
    .venv/bin/python scripts/bench_drain.py --orders 5000 --skip-baseline --json
    .venv/bin/python scripts/bench_drain.py --orders 20000 --skip-baseline --topology cluster
    .venv/bin/python scripts/bench_drain.py --orders 20000 --peer dramatiq --rounds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schema.topology import (
    COMMAND_QUEUES,
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    INVENTORY_EXCHANGE,
    PAYMENTS_QUEUE,
    delay_queue,
)
from scripts import benchkit, harness  # noqa: E402
from scripts.harness import ORDERS_CLI, Proc  # noqa: E402
from worker.rabbit.connection import (
    Outgoing,  # noqa: E402
    connection_parameters,  # noqa: E402
)
from worker.rabbit.publisher import PipelinedPublisher  # noqa: E402
from worker.settings import load_settings  # noqa: E402

DBNAME = "orders_bench"
VHOST = "orders-bench"
CAPTURE_QUEUE = "bench.capture"
CATALOGUE = ROOT / "config" / "products.demo.json"
POLL = 0.1  # seconds between two samples of the order count
BASELINE_WORKERS = 4
EVENTS_PER_ORDER = 3  # stock.reserve, order.placed, StartPayment
CAPTURED_PER_ORDER = 2  # StartPayment goes to orders.payments, not to the capture queue


class BenchError(Exception):
    """The run cannot go on (timeout, a process died, a service is missing)."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def check(self, what: str) -> None:
        if time.monotonic() > self.at:
            raise BenchError(f"gave up after {self.seconds:.0f}s (--timeout) while {what}")


def say(*args: Any) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


# -- environment ------------------------------------------------------------------


def make_vhost(user: str = "guest") -> str:
    if not harness.have_rabbitmqctl():
        say("rabbitmqctl not found: using vhost '/'")
        return "/"
    try:
        harness.create_vhost(VHOST, user)
        return VHOST
    except harness.HarnessError as exc:
        say(f"{exc}; using vhost '/'")
    return "/"


def service_env(vhost: str, tmp: Path, cluster: dict[str, str] | None = None) -> dict[str, str]:
    base = load_settings()  # host/user/password from the usual config and environment
    env = {"ORDERS_ENVIRONMENT": "development", **os.environ}
    path = "%2F" if vhost == "/" else vhost
    if cluster is not None:
        env.update({k: v for k, v in cluster.items() if k.startswith("ORDERS_DATABASE__")})
        nodes = [urlsplit(u).netloc for u in cluster["ORDERS_RABBITMQ__URL"].split(",")]
        amqp = ",".join(f"amqp://{netloc}/{path}" for netloc in nodes)
    else:
        url = base.rabbitmq.url.get_secret_value()
        prefix = url.rsplit("/", 1)[0] if url.count("/") >= 3 else url.rstrip("/")
        amqp = f"{prefix}/{path}"
    env.update(
        {
            "ORDERS_DATABASE__DBNAME": DBNAME,
            "ORDERS_RABBITMQ__URL": amqp,
            "ORDERS_LOGGING__LEVEL": os.environ.get("ORDERS_LOGGING__LEVEL", "WARNING"),
            "ORDERS_LOGGING__FORMAT": os.environ.get("ORDERS_LOGGING__FORMAT", "json"),
            "ORDERS_WORKER__LIVENESS_FILE": str(tmp / "alive"),
        }
    )
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run([ORDERS_CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"orders {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def products_for_bench() -> list[dict[str, Any]]:
    products = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    usable = [p for p in products if p.get("active", True) and p["currency"] == "USD"]
    if len(usable) < 2:
        raise BenchError(f"{CATALOGUE} has fewer than two active USD products")
    return usable


# -- RabbitMQ ------------------------------------------------------------------------


def prepare_queues(url: str, settings: Any, capture_type: str) -> None:
    conn = pika.BlockingConnection(connection_parameters(url, 60))
    ch = conn.channel()
    queues = [
        *COMMAND_QUEUES,
        PAYMENTS_QUEUE,
        DEAD_LETTER_QUEUE,
        *(delay_queue(s) for s in settings.worker.retry_delays_seconds),
    ]
    for q in queues:
        ch.queue_purge(q)
    ch.queue_delete(CAPTURE_QUEUE)
    ch.queue_declare(CAPTURE_QUEUE, durable=True, arguments={"x-queue-type": capture_type})
    ch.queue_bind(CAPTURE_QUEUE, INVENTORY_EXCHANGE, routing_key="#")
    ch.queue_bind(CAPTURE_QUEUE, EVENTS_EXCHANGE, routing_key="#")
    conn.close()


def queue_depths(url: str, queues: list[str]) -> dict[str, int]:
    return harness.queue_depths(url, queues)


def purge(url: str, queues: list[str]) -> None:
    conn = pika.BlockingConnection(connection_parameters(url, 60))
    try:
        ch = conn.channel()
        for q in queues:
            ch.queue_purge(q)
    finally:
        conn.close()


def make_orders(n: int, products: list[dict[str, Any]], seed: int = 7) -> list[dict[str, Any]]:
    """N PlaceOrder bodies with unique message ids: 1-3 lines, distinct products."""
    rnd = random.Random(seed)
    orders = []
    for i in range(n):
        picks = rnd.sample(products, rnd.randint(1, min(3, len(products))))
        orders.append(
            {
                "message_id": f"bench-{uuid.UUID(int=rnd.getrandbits(128), version=4)}",
                "body": {
                    "user_id": f"user-{i % 997}",
                    "items": [{"product_id": p["product_id"], "quantity": rnd.randint(1, 4)} for p in picks],
                    "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
                },
            }
        )
    return orders


def preload(url: str, orders: list[dict[str, Any]], deadline: Deadline) -> float:
    started = time.monotonic()
    publisher = PipelinedPublisher(url).connect()
    try:
        chunk = 1000
        for start in range(0, len(orders), chunk):
            deadline.check("preloading commands")
            publisher.publish_batch(
                [
                    Outgoing(
                        COMMANDS_EXCHANGE,
                        COMMAND_QUEUES["orders.place"],
                        json.dumps(o["body"], separators=(",", ":")).encode(),
                        {
                            "message_id": o["message_id"],
                            "type": "PlaceOrder",
                            "content_type": "application/json",
                            "delivery_mode": 2,
                        },
                    )
                    for o in orders[start : start + chunk]
                ],
                timeout=60,
            )
    finally:
        publisher.close()
    return time.monotonic() - started


class Capture(threading.Thread):
    """Consumes the capture queue like the Inventory Service would, counting events."""

    def __init__(self, url: str) -> None:
        super().__init__(name="capture", daemon=True)
        self.url = url
        self.count = 0
        self.by_key: dict[str, int] = {}
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            conn = pika.BlockingConnection(connection_parameters(self.url, 60))
            ch = conn.channel()
            ch.basic_qos(prefetch_count=5000)
            last = [0, 0]  # last tag seen, last tag acked

            def on_message(_ch: Any, method: Any, _props: Any, _body: bytes) -> None:
                self.count += 1
                self.by_key[method.routing_key] = self.by_key.get(method.routing_key, 0) + 1
                last[0] = method.delivery_tag
                if last[0] - last[1] >= 1000:
                    ch.basic_ack(last[0], multiple=True)
                    last[1] = last[0]

            ch.basic_consume(CAPTURE_QUEUE, on_message)
            self.ready.set()
            while not self.stop_event.is_set():
                conn.process_data_events(time_limit=0.1)
                if last[0] > last[1]:
                    ch.basic_ack(last[0], multiple=True)
                    last[1] = last[0]
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
            self.ready.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


# -- processes -------------------------------------------------------------------------


def start(name: str, args: list[str], env: dict[str, str], log: Path) -> Proc:
    """``orders ARGS…`` in a session of its own (the harness stops it with its children)."""
    return Proc(name, [ORDERS_CLI, *args], env, log, say=say)


def vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def system_ticks() -> tuple[int, int]:
    return benchkit.ProcFS().system_ticks()


#: the components whose CPU adds up to the service's cost per order (the benchmark's own is apart)
SERVICE_TOTAL = ("workers", "relay", "rabbitmq", "postgres", "postgres server")
#: the same for a peer, which has no relay
PEER_TOTAL = ("workers", "rabbitmq", "postgres", "postgres server")


def service_components(
    settings: Any, processes: dict[str, benchkit.GroupFinder], database: str | None = None
) -> dict[str, benchkit.GroupFinder]:
    """``processes`` (the service's or a peer's own), and the servers' share of this run: the RabbitMQ
    node(s) of the settings' URL, the backends of ``database`` (the settings' by default) less the
    benchmark's own connections, the PostgreSQL server processes (WAL writer, checkpointer: shared
    with whatever else runs), and the benchmark process itself."""
    amqp = [harness.amqp_port(u.strip()) for u in settings.rabbitmq.url.get_secret_value().split(",")]
    rabbit = [benchkit.Server(p) for p in amqp]
    pg = [benchkit.Server(p) for _, p in settings.database.nodes]
    db = database or settings.database.dbname
    me = os.getpid()

    def union(finders: list[benchkit.GroupFinder]) -> benchkit.GroupFinder:
        return lambda proc, stats: set().union(*(f(proc, stats) for f in finders))

    return {
        **processes,
        "rabbitmq": union([r.whole() for r in rabbit]),
        "postgres": union([s.postgres_backends(db, not_clients=lambda: [me]) for s in pg]),
        "postgres server": union([s.postgres_server() for s in pg]),
        "bench": lambda proc, stats: {me},  # itself only: the processes it started are the components above
    }


def component_meter(groups: dict[str, benchkit.GroupFinder]) -> benchkit.CpuMeter:
    """A meter of :func:`service_components`: the postmaster counts its own time, not the backends of every
    database that it reaps."""
    return benchkit.CpuMeter(groups, own_only=("postgres server",))


def shared_servers_before(settings: Any, seconds: float = 2.0) -> dict[str, float]:
    """Percent of a core the shared servers (the RabbitMQ node, PostgreSQL's server processes) and the whole
    machine use before a run starts: the neighbours' share, which a run's window counts as the run's too
    (the longer the window, the more: the paid path's more than the drain's)."""
    shared = {k: v for k, v in service_components(settings, {}).items() if k in ("rabbitmq", "postgres server")}
    meter = component_meter(shared)
    a = meter.snapshot()
    time.sleep(seconds)
    cost = benchkit.cpu_cost(a, meter.snapshot(), 1, ())
    return {**{k: round(cost.percent.get(k, 0.0), 1) for k in shared}, "machine": round(cost.machine_percent, 1)}


def window_cost(snaps: dict[str, Any], window: Window, total_of: tuple[str, ...]) -> benchkit.CpuCost | None:
    """CPU per order between the 10 % and 90 % snapshots (the rate's own window)."""
    if "10" not in snaps or "90" not in snaps or window.t10 is None or window.t90 is None:
        return None
    return benchkit.cpu_cost(snaps["10"], snaps["90"], window.t90[1] - window.t10[1], total_of)


def machine_busy(seconds: float = 1.0) -> float:
    """Percent of one core the whole machine is busy (idle check before a run)."""
    t1, i1 = system_ticks()
    time.sleep(seconds)
    t2, i2 = system_ticks()
    return 100.0 * (os.cpu_count() or 1) * ((t2 - t1) - (i2 - i1)) / max(1, t2 - t1)


# -- measuring -------------------------------------------------------------------------


def count_orders(cur: Any) -> tuple[int, int]:
    cur.execute("SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM outbox WHERE published_at IS NULL)")
    return cur.fetchone()


class Window:
    """Records the first samples at or past 10 % and 90 % of N."""

    def __init__(self, n: int, on_cross: Callable[[str], None] | None = None) -> None:
        self.n = n
        self.lo, self.hi = 0.1 * n, 0.9 * n
        self.t10 = self.t90 = None  # (time, count)
        self.on_cross = on_cross
        self.samples: list[tuple[float, int]] = []

    def feed(self, t: float, count: int) -> None:
        self.samples.append((t, count))
        if self.t10 is None and count >= self.lo:
            self.t10 = (t, count)
            if self.on_cross:
                self.on_cross("10")
        if self.t90 is None and count >= self.hi:
            self.t90 = (t, count)
            if self.on_cross:
                self.on_cross("90")

    def rate(self) -> float | None:
        if self.t10 is None or self.t90 is None or self.t90[0] <= self.t10[0]:
            return None
        return (self.t90[1] - self.t10[1]) / (self.t90[0] - self.t10[0])


def drain(
    args: argparse.Namespace,
    env: dict[str, str],
    settings: Any,
    url: str,
    tmp: Path,
    deadline: Deadline,
    procs: list[Proc],
    capture: Capture,
) -> dict[str, Any]:
    n = args.orders
    poll = psycopg2.connect(settings.database.dsn, connect_timeout=5, application_name="bench-poll")
    poll.autocommit = True
    cur = poll.cursor()

    t0 = time.monotonic()
    relay = start("relay", ["relay"], env, tmp / "relay.log")
    procs.append(relay)
    # only the command queues: the payment step (orders.payments) would call the payment
    # providers; StartPayment piles up in orders.payments and is purged afterwards
    queues = list(COMMAND_QUEUES)
    pool = start(
        "worker",
        ["worker", "--processes", str(args.processes), *(a for q in queues for a in ("-q", q))],
        env,
        tmp / "worker.log",
    )
    procs.append(pool)

    meter = component_meter(
        service_components(settings, {"workers": benchkit.tree(pool.pid), "relay": benchkit.tree(relay.pid)})
    )
    snaps: dict[str, Any] = {}
    window = Window(n, on_cross=lambda which: snaps.__setitem__(which, meter.snapshot()))

    t_all_orders = t_all_published = t_all_captured = None
    hwm: dict[int, int] = {}
    while True:
        deadline.check(
            f"draining (orders {window.samples[-1][1] if window.samples else 0}/{n}, "
            f"captured {capture.count}/{CAPTURED_PER_ORDER * n})"
        )
        for p in (relay, pool):
            if not p.alive():
                raise BenchError(f"`orders {p.name}` exited with {p.returncode}:\n{p.tail()}")
        if capture.error is not None:
            raise BenchError(f"capture consumer failed: {capture.error!r}")
        orders, unpublished = count_orders(cur)
        now = time.monotonic()
        window.feed(now - t0, orders)
        for child in pool.children():
            hwm[child] = max(hwm.get(child, 0), vm_hwm_kib(child))
        if t_all_orders is None and orders >= n:
            t_all_orders = now - t0
        if t_all_orders is not None and t_all_published is None and unpublished == 0:
            t_all_published = now - t0
        if t_all_captured is None and capture.count >= CAPTURED_PER_ORDER * n:
            t_all_captured = now - t0
        if t_all_orders is not None and t_all_published is not None and t_all_captured is not None:
            break
        time.sleep(POLL)

    cur.execute("SELECT count(*), count(published_at) FROM outbox")
    outbox_rows, outbox_published = cur.fetchone()
    cur.execute("SELECT status, count(*) FROM orders GROUP BY status")
    statuses = dict(cur.fetchall())
    poll.close()
    relay_hwm = vm_hwm_kib(relay.pid)
    depths = queue_depths(url, [*COMMAND_QUEUES, PAYMENTS_QUEUE, DEAD_LETTER_QUEUE, CAPTURE_QUEUE])
    cost = window_cost(snaps, window, SERVICE_TOTAL)
    return {
        "orders": n,
        "processes": args.processes,
        "drain_rate": window.rate(),
        "window_s": (window.t90[0] - window.t10[0]) if window.t10 and window.t90 else None,
        "all_orders_s": t_all_orders,
        "all_events_published_s": t_all_published,
        "all_events_captured_s": t_all_captured,
        "outbox_rows": outbox_rows,
        "outbox_published": outbox_published,
        "events_captured": capture.count,
        "events_captured_by_key": dict(capture.by_key),
        "statuses": statuses,
        "queue_depths_after": depths,
        "worker_peak_rss_mib": {str(pid): round(kib / 1024, 1) for pid, kib in sorted(hwm.items())},
        "relay_peak_rss_mib": round(relay_hwm / 1024, 1),
        "cpu_percent_10_90": cost.percent if cost else {},
        "cpu_us_per_order": cost.us_per_order if cost else {},
        "cpu_other_us_per_order": cost.other_us_per_order if cost else None,
        "machine_percent_10_90": cost.machine_percent if cost else None,
    }


# -- baseline: the same inserts, one transaction per order ---------------------------------

INSERTS = {
    "inbox": "INSERT INTO inbox (consumer, message_id) VALUES ('orders', %s)",
    "orders": (
        "INSERT INTO orders (order_id, user_id, status, currency, total, payment_provider, payment_request,"
        " next_action, reason, correlation_id, place_message_id)"
        " VALUES (%s, %s, 'pending', 'USD', %s, 'stripe', %s, NULL, NULL, NULL, %s)"
    ),
    "order_items": "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price) VALUES ",
    "order_transitions": (
        "INSERT INTO order_transitions (order_id, from_status, to_status, message_id, reason)"
        " VALUES (%s, NULL, 'pending', %s, NULL)"
    ),
    "outbox": (
        "INSERT INTO outbox (event_id, exchange, routing_key, message_type, order_id, correlation_id, body)"
        " VALUES (%s, 'inventory', 'stock.reserve', 'stock.reserve', %s, NULL, %s),"
        " (%s, 'orders.events', 'order.placed', 'order.placed', %s, NULL, %s),"
        " (%s, 'orders.internal', 'payment.start', 'StartPayment', %s, NULL, %s)"
    ),
}


def baseline_rows(orders: list[dict[str, Any]], prices: dict[str, int]) -> list[tuple]:
    rows = []
    for o in orders:
        mid, body = o["message_id"], o["body"]
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, mid))
        lines = [(i["product_id"], i["quantity"], prices[i["product_id"]]) for i in body["items"]]
        total = sum(q * p for _, q, p in lines)
        ev = [str(uuid.uuid4()) for _ in range(3)]
        now = "2024-01-01T00:00:00+00:00"
        items = [{"product_id": p, "quantity": q} for p, q, _ in lines]
        reserve = json.dumps({"event_id": ev[0], "order_id": oid, "occurred_at": now, "items": items})
        placed = json.dumps(
            {
                "event_id": ev[1],
                "order_id": oid,
                "occurred_at": now,
                "status": "pending",
                "user_id": body["user_id"],
                "total": total,
                "currency": "USD",
            }
        )
        start = json.dumps({"order_id": oid})
        rows.append(
            (
                mid,
                oid,
                body["user_id"],
                total,
                json.dumps(body["payment"]),
                lines,
                (ev[0], oid, reserve, ev[1], oid, placed, ev[2], oid, start),
            )
        )
    return rows


def _baseline_worker(dsn: str, rows: list[tuple], go: Any) -> None:
    conn = psycopg2.connect(dsn, application_name="bench-baseline")
    cur = conn.cursor()
    go.wait()
    for mid, oid, user, total, payment, lines, outbox in rows:
        cur.execute(INSERTS["inbox"], (mid,))
        cur.execute(INSERTS["orders"], (oid, user, total, payment, mid))
        values = ",".join(
            cur.mogrify("(%s,%s,%s,%s,%s)", (oid, n, p, q, price)).decode() for n, (p, q, price) in enumerate(lines, 1)
        )
        cur.execute(INSERTS["order_items"] + values)
        cur.execute(INSERTS["order_transitions"], (oid, mid))
        cur.execute(INSERTS["outbox"], outbox)
        conn.commit()
    conn.close()


TRUNCATE = "TRUNCATE orders, order_items, order_transitions, order_history, payments, inbox, outbox"


def baseline(settings: Any, orders: list[dict[str, Any]], prices: dict[str, int], deadline: Deadline) -> dict[str, Any]:
    dsn = settings.database.dsn
    poll = psycopg2.connect(dsn, connect_timeout=5, application_name="bench-poll")
    poll.autocommit = True
    cur = poll.cursor()
    cur.execute(TRUNCATE)
    rows = baseline_rows(orders, prices)
    ctx = mp.get_context("fork")
    go = ctx.Event()
    workers = [
        ctx.Process(target=_baseline_worker, args=(dsn, rows[i::BASELINE_WORKERS], go), daemon=True)
        for i in range(BASELINE_WORKERS)
    ]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)  # connections up
        window = Window(len(orders))
        t0 = time.monotonic()
        go.set()
        while True:
            deadline.check("running the baseline")
            n, _ = count_orders(cur)
            window.feed(time.monotonic() - t0, n)
            if n >= len(orders):
                break
            if not any(w.is_alive() for w in workers):
                raise BenchError(f"baseline processes exited with {n}/{len(orders)} orders inserted")
            time.sleep(POLL)
        total = time.monotonic() - t0
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join(5)
    cur.execute(TRUNCATE)
    poll.close()
    return {"rate": window.rate(), "total_s": total, "connections": BASELINE_WORKERS}


PGBENCH_SCRIPT = """\
\\set q random(1, 4)
BEGIN;
INSERT INTO inbox (consumer, message_id) VALUES ('orders', 'pgb-' || gen_random_uuid()::text);
INSERT INTO orders (order_id, user_id, status, currency, total, payment_provider, payment_request, place_message_id)
  VALUES (gen_random_uuid(), 'user-' || :client_id, 'pending', 'USD', 1200 * :q, 'stripe',
          '{"provider":"stripe","payment_method":"pm_card_visa"}', 'pgb-' || :client_id || '-' || random())
  RETURNING quote_literal(order_id) AS order_id \\gset
INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price)
  VALUES (:order_id, 1, 'sku-mug-001', :q, 1200), (:order_id, 2, 'sku-tee-002', 1, 2500);
INSERT INTO order_transitions (order_id, from_status, to_status, message_id) VALUES (:order_id, NULL, 'pending', 'pgb');
INSERT INTO outbox (event_id, exchange, routing_key, message_type, order_id, body) VALUES
  (gen_random_uuid(), 'inventory', 'stock.reserve', 'stock.reserve', :order_id, '{"items":[{"product_id":"sku-mug-001","quantity":1}]}'),
  (gen_random_uuid(), 'orders.events', 'order.placed', 'order.placed', :order_id, '{"status":"pending","total":1200}'),
  (gen_random_uuid(), 'orders.internal', 'payment.start', 'StartPayment', :order_id, '{}');
COMMIT;
"""


def pgbench(settings: Any, n: int, tmp: Path, deadline: Deadline) -> dict[str, Any] | None:
    exe = shutil.which("pgbench")
    if exe is None:
        return None
    script = tmp / "place_order.sql"
    script.write_text(PGBENCH_SCRIPT)
    d = settings.database
    env = {**os.environ, "PGPASSWORD": d.password.get_secret_value()}
    per_client = max(1, n // BASELINE_WORKERS)
    cmd = [
        exe,
        "-n",
        "-h",
        d.host,
        "-p",
        str(d.port),
        "-U",
        d.user,
        "-c",
        str(BASELINE_WORKERS),
        "-j",
        str(min(BASELINE_WORKERS, os.cpu_count() or 1)),
        "-t",
        str(per_client),
        "-f",
        str(script),
        d.dbname,
    ]
    remaining = max(10.0, deadline.at - time.monotonic())
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=remaining)
    except subprocess.TimeoutExpired:
        raise BenchError("pgbench did not finish before the deadline") from None
    finally:
        conn = psycopg2.connect(d.dsn, connect_timeout=5)
        conn.autocommit = True
        conn.cursor().execute(TRUNCATE)
        conn.close()
    if done.returncode != 0:
        say("pgbench failed:", done.stderr.strip()[-500:])
        return {"error": done.stderr.strip()[-500:]}
    tps = None
    for line in done.stdout.splitlines():
        if line.startswith("tps ="):
            tps = float(line.split()[2])
    return {"tps": tps, "command": " ".join(cmd[:1] + cmd[1:]), "clients": BASELINE_WORKERS}


# -- the Dramatiq peer: the same order transaction, as a Python team would write it ----------

PEERS_DIR = ROOT / "scripts" / "peers"
PEER_DB = "orders_bench_peer"
PEER_VHOST = "orders-bench-peer"
PEER_QUEUE = "peer_dramatiq"
INSTALL_PEERS = ".venv/bin/pip install -e '.[bench]'"


def dramatiq_cli() -> str:
    """The ``dramatiq`` command beside this interpreter; a plain error saying how to install it when missing."""
    exe = Path(sys.executable).parent / "dramatiq"
    try:
        import dramatiq  # noqa: F401 - only asking whether it is there
    except ImportError:
        exe = Path("/nonexistent")
    if not exe.exists():
        raise BenchError(
            "the Dramatiq peer needs Dramatiq 2 with RabbitMQ support, which this venv does not have; "
            f"install the benchmarks' extra: {INSTALL_PEERS}"
        )
    return str(exe)


def peer_env(settings: Any, vhost: str, database: Any, **extra: str) -> dict[str, str]:
    """The peers' environment: their broker (a vhost of their own) and database (``PEER_AMQP``, ``PEER_DSN``)."""
    return {
        **os.environ,
        "PEER_AMQP": harness.vhost_url(settings.rabbitmq.url.get_secret_value(), vhost),
        "PEER_DSN": database.dsn,
        **extra,
    }


def fresh_peer_database(settings: Any, name: str) -> Any:
    """Database ``name`` on the configured server, dropped and made anew (the peer makes its own tables)."""
    from worker import db

    database = settings.database.model_copy(update={"dbname": name})
    db.drop_database(database)
    db.ensure_database(database)
    return database


def measure_peer(args: Any, tmp: Path, deadline: Deadline) -> dict[str, Any]:
    """The Dramatiq peer's drain: N messages preloaded, ``dramatiq peer_dramatiq -p P -t T``, rows/s 10 %→90 %."""
    tmp.mkdir(parents=True, exist_ok=True)
    exe = dramatiq_cli()
    n = args.orders
    settings = load_settings(environ={"ORDERS_ENVIRONMENT": "development", **os.environ})
    vhost = harness.private_vhost_or_default(PEER_VHOST) or "/"
    database = fresh_peer_database(settings, PEER_DB)
    env = peer_env(settings, vhost, database)
    url = env["PEER_AMQP"]
    say(f"peer: preloading {n} messages (Dramatiq, vhost {vhost}, database {PEER_DB}) ...")
    idle_busy = machine_busy()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "peer_dramatiq.py", str(n)],
        cwd=PEERS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(10.0, deadline.at - time.monotonic()),
    )
    if done.returncode != 0:
        raise BenchError(f"the peer's preload failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    preload_s = time.monotonic() - started
    depth = queue_depths(url, [PEER_QUEUE])[PEER_QUEUE]
    if depth != n:
        raise BenchError(f"{PEER_QUEUE} holds {depth} messages after preloading {n}")
    say(f"peer: preloaded in {preload_s:.1f} s; draining with {args.processes} x {args.peer_threads} threads ...")
    poll = psycopg2.connect(database.dsn, connect_timeout=5, application_name="bench-poll")
    poll.autocommit = True
    cur = poll.cursor()
    workers = Proc(
        "dramatiq",
        [exe, "peer_dramatiq", "-p", str(args.processes), "-t", str(args.peer_threads)]
        + ["--worker-shutdown-timeout", "5000"],
        env,
        tmp / "peer.log",
        cwd=PEERS_DIR,
        say=say,
    )
    try:
        meter = component_meter(service_components(settings, {"workers": benchkit.tree(workers.pid)}, database=PEER_DB))
        snaps: dict[str, Any] = {}
        window = Window(n, on_cross=lambda which: snaps.__setitem__(which, meter.snapshot()))
        t0 = time.monotonic()
        while window.t90 is None:
            deadline.check(f"draining the peer ({window.samples[-1][1] if window.samples else 0}/{n} rows)")
            if not workers.alive():
                raise BenchError(f"dramatiq exited with {workers.returncode}:\n{workers.tail()}")
            cur.execute("SELECT count(*) FROM peer_orders")
            window.feed(time.monotonic() - t0, cur.fetchone()[0])
            time.sleep(POLL)
    finally:
        workers.stop(timeout=15)
        poll.close()
        try:
            purge(url, [PEER_QUEUE])
        except Exception:  # noqa: BLE001 - best effort: the next preload flushes it anyway
            pass
    cost = window_cost(snaps, window, PEER_TOTAL)
    return {
        "peer": "dramatiq",
        "orders": n,
        "processes": args.processes,
        "threads": args.peer_threads,
        "drain_rate": window.rate(),
        "window_s": (window.t90[0] - window.t10[0]) if window.t10 and window.t90 else None,
        "cpu_percent_10_90": cost.percent if cost else {},
        "cpu_us_per_order": cost.us_per_order if cost else {},
        "cpu_other_us_per_order": cost.other_us_per_order if cost else None,
        "machine_percent_10_90": cost.machine_percent if cost else None,
        "busy_before_run_percent": round(idle_busy, 1),
        "preload_s": preload_s,
        "vhost": vhost,
        "database": PEER_DB,
    }


def rounds(args: Any, tmp: Path) -> dict[str, Any]:
    """``--rounds`` drains of ours (and of the peer, alternating who goes first: ABBA...), and their medians."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
    for i in range(args.rounds):
        order = ["ours", "peer"] if i % 2 == 0 else ["peer", "ours"]
        for who in order if args.peer else ["ours"]:
            say(f"round {i + 1}/{args.rounds}: {who}")
            deadline = Deadline(args.timeout)
            if who == "ours":
                runs["ours"].append(measure(args, tmp / f"ours-{i + 1}", deadline, None))
            else:
                runs["peer"].append(measure_peer(args, tmp / f"peer-{i + 1}", deadline))
    ours = [r["drain"] for r in runs["ours"]]
    peer = runs["peer"]
    summary: dict[str, Any] = {
        "rounds": args.rounds,
        "orders": args.orders,
        "ours_rates": [r["drain_rate"] for r in ours],
        "ours_median": benchkit.median(r["drain_rate"] for r in ours),
        "ours_us_per_order_median": benchkit.median_costs(
            [r["cpu_us_per_order"] for r in ours if r["cpu_us_per_order"]]
        ),
        "machine": benchkit.machine_line(),
    }
    if args.peer:
        summary.update(
            {
                "peer": args.peer,
                "peer_rates": [r["drain_rate"] for r in peer],
                "peer_median": benchkit.median(r["drain_rate"] for r in peer),
                "peer_us_per_order_median": benchkit.median_costs(
                    [r["cpu_us_per_order"] for r in peer if r["cpu_us_per_order"]]
                ),
            }
        )
        summary["ratio"] = benchkit.ratio(summary["ours_median"], summary["peer_median"])
    summary["runs"] = runs
    return summary


def rounds_table(summary: dict[str, Any]) -> str:
    peer = summary.get("peer")
    lines = [
        f"{summary['orders']} orders per drain, {summary['rounds']} round(s)"
        + (", alternating who goes first (ABBA...)" if peer else "")
        + f"; {summary['machine']}",
        "",
        f"| round | ours orders/s | {peer + ' orders/s |' if peer else ''}",
        "|---:|---:|" + ("---:|" if peer else ""),
    ]
    for i, rate in enumerate(summary["ours_rates"]):
        row = f"| {i + 1} | {fmt(rate)} |"
        if peer:
            rates = summary["peer_rates"]
            row += f" {fmt(rates[i] if i < len(rates) else None)} |"
        lines.append(row)
    lines.append(
        f"| median | **{fmt(summary['ours_median'])}** |" + (f" **{fmt(summary['peer_median'])}** |" if peer else "")
    )
    lines.append("")
    if peer:
        lines.append(f"ours / {peer}: {fmt(summary['ratio'], '.2f')} (medians)")
    lines.append("CPU µs per order, 10-90 %, medians of the rounds:")
    lines.append(f"  ours: {cost_line(summary['ours_us_per_order_median'])}")
    if peer:
        lines.append(f"  {peer}: {cost_line(summary['peer_us_per_order_median'])}")
    return "\n".join(lines)


# -- report ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model}


def fmt(v: Any, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def cost_line(us: dict[str, float], other: float | None = None) -> str:
    """``workers 160, relay 65, ... = total 490 (bench 30, other 12)``: the service's components, then the rest."""
    if not us:
        return "n/a"
    first = [k for k in ("workers", "relay", "rabbitmq", "postgres", "postgres server") if k in us]
    parts = [f"{k} {us[k]:.0f}" for k in [*first, *(k for k in us if k not in first)] if k not in ("total", "bench")]
    tail = [f"bench {us['bench']:.0f}"] if "bench" in us else []
    if other is not None:
        tail.append(f"others on the machine {other:.0f}")
    return ", ".join(parts) + f" = total {us.get('total', 0):.0f}" + (f"  ({', '.join(tail)})" if tail else "")


def table(result: dict[str, Any]) -> str:
    d, b, m = result["drain"], result.get("baseline"), result["machine"]
    rate, base = d["drain_rate"], (b or {}).get("rate")
    ratio = rate / base if rate and base else None
    pgb = result.get("pgbench") or {}
    rows = [
        ("orders", f"{d['orders']}  (capture queue: {result['capture_queue']})"),
        ("worker processes", f"{d['processes']}"),
        ("settings (env)", " ".join(f"{k}={v}" for k, v in sorted(result["overrides"].items())) or "defaults"),
        ("drained orders/s (10-90%)", f"{fmt(rate)}  ({fmt(d['window_s'], '.2f', ' s')} window)"),
        ("baseline orders/s (psycopg2, tx/order)", f"{fmt(base)}  ({BASELINE_WORKERS} processes)" if b else "skipped"),
        ("ratio drained/baseline", fmt(ratio, ".2f")),
        ("pgbench tps (same inserts)", fmt(pgb.get("tps")) if pgb else "skipped / not installed"),
        ("all orders committed after", fmt(d["all_orders_s"], ".2f", " s")),
        (
            "all events published after",
            fmt(d["all_events_published_s"], ".2f", " s")
            + f"  ({d['outbox_published']}/{d['outbox_rows']} outbox rows)",
        ),
        (
            "all events captured after",
            fmt(d["all_events_captured_s"], ".2f", " s") + f"  ({d['events_captured']} events)",
        ),
        ("peak RSS per worker (VmHWM)", ", ".join(f"{v} MiB" for v in d["worker_peak_rss_mib"].values()) or "n/a"),
        ("peak RSS relay", f"{d['relay_peak_rss_mib']} MiB"),
        ("CPU µs per order, 10-90%", cost_line(d["cpu_us_per_order"], d.get("cpu_other_us_per_order"))),
        (
            "CPU % during 10-90% (100 = 1 core)",
            ", ".join(f"{k} {v:.0f}" for k, v in d["cpu_percent_10_90"].items())
            + f"; machine {fmt(d.get('machine_percent_10_90'))}",
        ),
        ("order statuses", ", ".join(f"{k} {v}" for k, v in d["statuses"].items())),
        ("preload (not measured)", fmt(result["preload_s"], ".1f", " s")),
        ("machine", f"{m['nproc']} CPUs, {m['cpu_model']}; {result['busy_before_run_percent']}% busy before the run"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


# -- main ----------------------------------------------------------------------------------


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--orders", type=int, default=20000, help="PlaceOrder commands to preload (default 20000)")
    ap.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--skip-baseline", action="store_true", help="skip the psycopg2 and pgbench baselines")
    ap.add_argument("--no-pgbench", action="store_true", help="skip only the pgbench baseline")
    ap.add_argument(
        "--capture-queue",
        choices=("quorum", "classic"),
        default="quorum",
        help="type of the event capture queue (default quorum, like the service's own queues)",
    )
    ap.add_argument(
        "--topology",
        choices=("single", "cluster"),
        default="single",
        help="cluster: the same run on this machine's servers, then on scripts/cluster.sh's cluster (needs root)",
    )
    ap.add_argument(
        "--peer",
        choices=("dramatiq",),
        help="also drain the same orders with the Dramatiq peer (scripts/peers/peer_dramatiq.py: the same "
        "order transaction, no event relay) in alternating rounds; implies --skip-baseline; needs "
        f"{INSTALL_PEERS}",
    )
    ap.add_argument("--peer-threads", type=int, default=8, help="threads per peer process (default 8)")
    ap.add_argument(
        "--rounds", type=int, default=1, help="drains of each side (default 1); with more, the medians are printed"
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    ap.add_argument(
        "--timeout", type=float, default=600, help="give up after this many seconds per drain (default 600)"
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the worker/relay logs (path printed)")
    args = ap.parse_args(argv)
    if args.orders < 10 or args.processes < 1 or args.rounds < 1:
        ap.error("--orders must be >= 10, --processes and --rounds >= 1")
    if args.peer or args.rounds > 1:
        if args.topology == "cluster":
            ap.error("--peer and --rounds run on this machine's servers only (no --topology cluster)")
        args.skip_baseline = True
        if args.peer:
            try:
                dramatiq_cli()
            except BenchError as exc:
                ap.error(str(exc))

    deadline = Deadline(args.timeout * (2 if args.topology == "cluster" else 1))
    tmp = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    # SIGTERM behaves like Ctrl-C, so the clean-up always runs
    signal.signal(signal.SIGTERM, _interrupt)
    cluster_ours = False  # a cluster this run brought up is removed at its end; one that was there stays
    try:
        if args.peer or args.rounds > 1:
            summary = rounds(args, tmp)
            print(json.dumps(summary, indent=2, default=str) if args.json else rounds_table(summary))
            return 0
        single = measure(args, tmp / "single", deadline, None)
        if args.topology != "cluster":
            print(json.dumps(single, indent=2, default=str) if args.json else table(single))
            return 0
        say("the same run on the cluster (scripts/cluster.sh up) ...")
        cluster_ours = not harness.cluster_exists()
        try:
            settings = harness.cluster_up()
        except harness.HarnessError as exc:
            raise BenchError(str(exc)) from None
        os.environ["ORDERS_TEST_RABBITMQCTL"] = harness.cluster_rabbitmqctl(settings)
        clustered = measure(args, tmp / "cluster", deadline, settings)
        a, b = single["drain"]["drain_rate"], clustered["drain"]["drain_rate"]
        both = {"single": single, "cluster": clustered, "cluster_over_single": b / a if a and b else None}
        if args.json:
            print(json.dumps(both, indent=2, default=str))
        else:
            print("one node (this machine's PostgreSQL and RabbitMQ):")
            print(table(single))
            print("cluster (3 RabbitMQ nodes, quorum queues with 3 members; PostgreSQL with a synchronous standby):")
            print(table(clustered))
            print(f"cluster / one node: {fmt(both['cluster_over_single'], '.2f')} (the cost of replication, same run)")
        return 0
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if cluster_ours:
            say("removing the cluster this run brought up (scripts/cluster.sh down)")
            harness.cluster_down()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)


def measure(args: Any, tmp: Path, deadline: Deadline, cluster: dict[str, str] | None) -> dict[str, Any]:
    """One preload-and-drain (and the baselines unless skipped) on one node or on the cluster."""
    tmp.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    capture: Capture | None = None
    url = ""
    try:
        user = urlsplit(cluster["ORDERS_RABBITMQ__URL"].split(",")[0]).username if cluster else None
        vhost = make_vhost(user or "guest")
        env = service_env(vhost, tmp, cluster)
        settings = load_settings(environ=env)
        url = settings.rabbitmq.url.get_secret_value()
        overrides = {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("ORDERS_WORKER__", "ORDERS_RELAY__", "ORDERS_DATABASE__POOL"))
        }

        say(f"database {DBNAME}, vhost {vhost}, logs in {tmp}")
        idle_busy = machine_busy()
        if idle_busy > 20:
            say(
                f"warning: the machine is already {idle_busy:.0f}% busy (100 = one core) before the run; "
                "figures will be low and noisy"
            )
        harness.drop_database(settings.database)
        run_cli(["migrate"], env)
        run_cli(["topology"], env)
        run_cli(["products", "import", str(CATALOGUE)], env)
        products = products_for_bench()
        prices = {p["product_id"]: p["price"] for p in products}
        prepare_queues(url, settings, args.capture_queue)
        capture = Capture(url)
        capture.start()
        capture.ready.wait(10)
        if capture.error is not None:
            raise BenchError(f"capture consumer failed: {capture.error!r}")

        orders = make_orders(args.orders, products)
        say(f"preloading {args.orders} PlaceOrder commands ...")
        preload_s = preload(url, orders, deadline)
        depth = queue_depths(url, ["orders.place"])["orders.place"]
        if depth != args.orders:
            raise BenchError(f"orders.place holds {depth} messages after preloading {args.orders}")
        say(f"preloaded in {preload_s:.1f} s; draining with {args.processes} worker process(es) ...")

        drained = drain(args, env, settings, url, tmp, deadline, procs, capture)
        for p in reversed(procs):
            p.stop()
        procs.clear()
        capture.stop()
        purge(url, [PAYMENTS_QUEUE, CAPTURE_QUEUE])

        result: dict[str, Any] = {
            "drain": drained,
            "preload_s": preload_s,
            "machine": machine(),
            "busy_before_run_percent": round(idle_busy, 1),
            "capture_queue": args.capture_queue,
            "overrides": overrides,
            "vhost": vhost,
            "database": DBNAME,
        }
        if not args.skip_baseline:
            say(f"baseline: {args.orders} orders, one transaction each, {BASELINE_WORKERS} processes ...")
            result["baseline"] = baseline(settings, orders, prices, deadline)
            if not args.no_pgbench:
                say("pgbench with the same inserts ...")
                result["pgbench"] = pgbench(settings, args.orders, tmp, deadline)
        rate, base = drained["drain_rate"], (result.get("baseline") or {}).get("rate")
        result["ratio"] = rate / base if rate and base else None
        return result
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # don't interrupt the clean-up
        for p in reversed(procs):
            p.stop(timeout=15)
        if capture is not None:
            capture.stop()
        if url:
            try:
                purge(url, [*COMMAND_QUEUES, PAYMENTS_QUEUE])
            except Exception:  # noqa: BLE001 - best effort
                pass
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
