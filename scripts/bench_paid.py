#!/usr/bin/env python3
"""The paid path beside a peer: card orders until they are completed (a benchmark, not a test).

What a user feels: a card order placed, paid through Stripe (the local fake,
answering after ``--latency-ms``), completed.  Two measures, each for ours and
for the Dramatiq peer, in alternating rounds (who goes first alternates),
each round on a fresh database, vhost and Stripe fake:

* **saturation** (``--mode saturation``): N card orders preloaded, completed
  orders/s from 10 % to 90 % of N, and CPU µs per completed order per component
  over the same window.  Ours: N PlaceOrders (1-3 lines of the demo catalogue,
  ``pm_card_visa``) published upstream to ``orders.commands``, then the worker
  pool (every work queue, ``orders.payments`` included) and the relay started
  as ``scripts/bench_drain.py`` starts them; counted: orders ``completed``.
  The peer: ``scripts/peers/peer_paid_dramatiq.py`` (the shared peers' paid
  path: per order one transaction, the Stripe create+confirm through the SDK
  with an idempotency key, one transaction), ``dramatiq -p 2 -t 8``; counted:
  its orders ``completed``.
* **latency** (``--mode latency``): card orders offered open-loop (order i is
  published at start + i/rate whatever happened before; latency counted from
  that scheduled time, so a late generator cannot hide a queue) at
  ``--fractions`` (default 0.5 and 0.8) of each side's own saturation (measured
  in the same run, or given with ``--saturation OURS,PEER``), for ``--seconds``
  each.  Ours: PlaceOrders published upstream to ``orders.commands`` (not
  POSTed through the shim: ``scripts/bench_http.py`` measures that edge), the
  latency of an order from its publish to its ``order.completed`` consumed from
  a queue bound to ``orders.events`` (what a downstream service sees), and,
  like the peer's, to its row being completed (``orders.updated_at`` of the
  completing transaction).  The peer: its actor's message sent at the scheduled
  time, the latency to its row being completed (``peer_payments.at``, the
  completing transaction's time).  Printed: offered and completed orders/s,
  p50/p90/p99/p99.9, the orders not completed ``--grace`` seconds after the
  load stopped, CPU µs per completed order.  ``--stages`` (ours) also splits
  each judged order's latency at the moments the database and the broker
  show: its PlaceOrder's transaction (``orders.created_at``), its
  ``payment.start`` published by the relay (a copy consumed from a queue bound
  to ``orders.internal``), the completing transaction, ``order.completed``
  consumed; medians and p90 of each stage.

``--mode all`` (default) runs saturation, then latency at fractions of the
saturation medians.  The Stripe fake's CPU is printed beside the others but is
not in the total (it stands for Stripe).  The peers need Dramatiq 2:
``.venv/bin/pip install -e '.[bench]'`` (``--no-peer`` measures ours alone).

Usage::

    .venv/bin/python scripts/bench_paid.py --orders 5000 --rounds 3
    .venv/bin/python scripts/bench_paid.py --mode saturation --orders 5000 --rounds 3 --latency-ms 150
    .venv/bin/python scripts/bench_paid.py --mode latency --saturation 80,290 --seconds 60

Isolation: databases ``orders_bench_paid`` and ``orders_bench_paid_peer``,
vhosts ``orders-bench-paid`` and ``orders-bench-paid-peer`` (``/`` when
rabbitmqctl is missing), a Stripe fake on a free port per round.  Every
process it starts is stopped at the end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pika
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schema.topology import (  # noqa: E402
    COMMAND_QUEUES,
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    INTERNAL_EXCHANGE,
    WORK_QUEUES,
)
from scripts import benchkit, harness  # noqa: E402
from scripts.bench_drain import (  # noqa: E402
    CATALOGUE,
    PEER_TOTAL,
    PEERS_DIR,
    POLL,
    SERVICE_TOTAL,
    BenchError,
    Deadline,
    Window,
    component_meter,
    cost_line,
    dramatiq_cli,
    fresh_peer_database,
    make_orders,
    peer_env,
    preload,
    products_for_bench,
    purge,
    run_cli,
    say,
    service_components,
    shared_servers_before,
    window_cost,
)
from scripts.harness import Proc  # noqa: E402
from worker.rabbit.connection import connection_parameters  # noqa: E402
from worker.settings import load_settings  # noqa: E402

OURS_DB, OURS_VHOST = "orders_bench_paid", "orders-bench-paid"
PEER_DB, PEER_VHOST = "orders_bench_paid_peer", "orders-bench-paid-peer"
PEER_QUEUE = "peer_paid"
COMPLETED_QUEUE = "bench.completed"
#: with --stages: a copy of every payment.start the relay publishes
STARTS_QUEUE = "bench.starts"
FAKE = ROOT / "scripts" / "fakes" / "fake_stripe.py"
#: orders published in the first seconds of an open-loop run are warm-up, not judged
WARMUP_S = 5.0


# -- the Stripe fake ------------------------------------------------------------------------


def start_fake(latency_ms: float, log: Path) -> tuple[Proc, str]:
    """A Stripe fake of this round's own on a free port; (process, base URL) once it answers."""
    port = harness.free_port()
    proc = Proc(
        "stripe-fake",
        [sys.executable, str(FAKE), "--port", str(port), "--latency-ms", str(latency_ms)],
        None,
        log,
        say=say,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if not proc.alive():
            raise BenchError(f"the Stripe fake exited:\n{proc.tail()}")
        try:
            return httpx.get(url + "/_fake/latency", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    harness.wait_until(answers, timeout=30, interval=0.1, what="the Stripe fake")
    return proc, url


# -- ours --------------------------------------------------------------------------------------


class Ours:
    """Our stack for one round: fresh database and vhost, the fake, the worker pool and the relay."""

    def __init__(self, args: Any, tmp: Path, database: str = OURS_DB, vhost: str = OURS_VHOST) -> None:
        self.args, self.tmp = args, tmp
        self.database, self.vhost = database, vhost
        tmp.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.capture: Completions | None = None

    def prepare(self) -> None:
        self.fake, fake_url = start_fake(self.args.latency_ms, self.tmp / "stripe.log")
        self.procs.append(self.fake)
        vhost = harness.private_vhost_or_default(self.vhost) or "/"
        base = load_settings(environ={"ORDERS_ENVIRONMENT": "development", **os.environ})
        self.url = harness.vhost_url(base.rabbitmq.url.get_secret_value(), vhost)
        self.env = {
            "ORDERS_ENVIRONMENT": "development",
            **os.environ,
            "ORDERS_DATABASE__DBNAME": self.database,
            "ORDERS_RABBITMQ__URL": self.url,
            "ORDERS_STRIPE__API_BASE": fake_url,
            "ORDERS_LOGGING__LEVEL": os.environ.get("ORDERS_LOGGING__LEVEL", "WARNING"),
            "ORDERS_LOGGING__FORMAT": os.environ.get("ORDERS_LOGGING__FORMAT", "json"),
            "ORDERS_WORKER__LIVENESS_FILE": str(self.tmp / "alive"),
            "ORDERS_METRICS__PORT": "0",
        }
        self.settings = load_settings(environ=self.env)
        harness.drop_database(self.settings.database)
        run_cli(["migrate"], self.env)
        run_cli(["topology"], self.env)
        run_cli(["products", "import", str(CATALOGUE)], self.env)
        conn = pika.BlockingConnection(connection_parameters(self.url, 60))
        ch = conn.channel()
        for q in WORK_QUEUES:
            ch.queue_purge(q)
        ch.queue_delete(COMPLETED_QUEUE)
        ch.queue_declare(COMPLETED_QUEUE, durable=True, arguments={"x-queue-type": self.args.capture_queue})
        ch.queue_bind(COMPLETED_QUEUE, EVENTS_EXCHANGE, routing_key="order.completed")
        ch.queue_delete(STARTS_QUEUE)
        stages = getattr(self.args, "stages", False)
        if stages:
            ch.queue_declare(STARTS_QUEUE, durable=True, arguments={"x-queue-type": self.args.capture_queue})
            ch.queue_bind(STARTS_QUEUE, INTERNAL_EXCHANGE, routing_key="payment.start")
        conn.close()
        self.capture = Completions(self.url, STARTS_QUEUE if stages else None)
        self.capture.start()
        self.capture.ready.wait(10)
        if self.capture.error is not None:
            raise BenchError(f"the order.completed consumer failed: {self.capture.error!r}")
        self.db = psycopg2.connect(self.settings.database.dsn, connect_timeout=5, application_name="bench-poll")
        self.db.autocommit = True

    def orders(self, n: int) -> list[dict[str, Any]]:
        orders = make_orders(n, products_for_bench(), seed=11)
        for o in orders:
            o["body"]["order_id"] = str(uuid.uuid4())
        return orders

    def start_stack(self) -> None:
        self.relay = Proc.orders(["relay"], self.env, self.tmp / "relay.log")
        self.pool = Proc.orders(["worker", "--processes", str(self.args.processes)], self.env, self.tmp / "worker.log")
        self.procs += [self.relay, self.pool]

    def components(self) -> dict[str, benchkit.GroupFinder]:
        return service_components(
            self.settings,
            {
                "workers": benchkit.tree(self.pool.pid),
                "relay": benchkit.tree(self.relay.pid),
                "stripe fake": benchkit.tree(self.fake.pid),
            },
        )

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise BenchError(f"{p.name} exited with {p.returncode}:\n{p.tail()}")
        if self.capture is not None and self.capture.error is not None:
            raise BenchError(f"the order.completed consumer failed: {self.capture.error!r}")

    def counts(self) -> tuple[int, int]:
        """(completed, rejected) orders."""
        with self.db.cursor() as cur:
            cur.execute(
                "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'rejected')"
                " FROM orders"
            )
            done, rejected = cur.fetchone()
        return int(done), int(rejected)

    def completed_rows(self) -> dict[str, float]:
        """order id → epoch of the transaction that completed it."""
        with self.db.cursor() as cur:
            cur.execute(
                "SELECT order_id::text, extract(epoch FROM updated_at)::float8 FROM orders WHERE status = 'completed'"
            )
            return dict(cur.fetchall())

    def placed_rows(self) -> dict[str, float]:
        """order id → epoch of the transaction that placed it."""
        with self.db.cursor() as cur:
            cur.execute("SELECT order_id::text, extract(epoch FROM created_at)::float8 FROM orders")
            return dict(cur.fetchall())

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=15)
        if self.capture is not None:
            self.capture.stop()
        if getattr(self, "db", None) is not None:
            self.db.close()
        if getattr(self, "url", None):
            try:
                purge(self.url, [*WORK_QUEUES, COMPLETED_QUEUE])
            except Exception:  # noqa: BLE001 - best effort
                pass


class Completions(threading.Thread):
    """Consumes ``order.completed`` from a queue bound to ``orders.events``: order id → time it arrived (and,
    given ``starts_queue``, the ``payment.start`` copies bound there: order id → time it arrived)."""

    def __init__(self, url: str, starts_queue: str | None = None) -> None:
        super().__init__(name="completions", daemon=True)
        self.url = url
        self.starts_queue = starts_queue
        self.at: dict[str, float] = {}
        self.starts: dict[str, float] = {}
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            conn = pika.BlockingConnection(connection_parameters(self.url, 60))
            ch = conn.channel()
            ch.basic_qos(prefetch_count=2000)
            last = [0, 0]

            def on_message(_ch: Any, method: Any, _props: Any, body: bytes) -> None:
                now = time.time()
                into = self.starts if method.routing_key == "payment.start" else self.at
                into.setdefault(json.loads(body)["order_id"], now)
                last[0] = method.delivery_tag
                if last[0] - last[1] >= 500:
                    ch.basic_ack(last[0], multiple=True)
                    last[1] = last[0]

            ch.basic_consume(COMPLETED_QUEUE, on_message)
            if self.starts_queue is not None:
                ch.basic_consume(self.starts_queue, on_message)  # delivery tags are the channel's: one ack run
            self.ready.set()
            while not self.stop_event.is_set():
                conn.process_data_events(time_limit=0.05)
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


def ours_saturation(args: Any, tmp: Path) -> dict[str, Any]:
    deadline = Deadline(args.timeout)
    ours = Ours(args, tmp)
    try:
        ours.prepare()
        n = args.orders
        before = shared_servers_before(ours.settings)
        say(f"ours: preloading {n} card orders (latency of the fake {args.latency_ms:g} ms) ...")
        preload(ours.url, ours.orders(n), deadline)
        ours.start_stack()
        meter = component_meter(ours.components())
        result = saturate(
            n, deadline, meter, lambda: ours.counts()[0], ours.check_alive, SERVICE_TOTAL, "ours completing"
        )
        result["rejected"] = ours.counts()[1]
        result["before_run_percent"] = before
        return result
    finally:
        ours.close()


def saturate(
    n: int,
    deadline: Deadline,
    meter: benchkit.CpuMeter,
    completed: Any,
    check: Any,
    total_of: tuple[str, ...],
    what: str,
) -> dict[str, Any]:
    """Poll the completed count until 90 % of N; the rate and the CPU per order from 10 % to 90 %."""
    snaps: dict[str, Any] = {}
    window = Window(n, on_cross=lambda which: snaps.__setitem__(which, meter.snapshot()))
    t0 = time.monotonic()
    while window.t90 is None:
        deadline.check(f"{what} ({window.samples[-1][1] if window.samples else 0}/{n})")
        check()
        window.feed(time.monotonic() - t0, completed())
        time.sleep(POLL)
    cost = window_cost(snaps, window, total_of)
    return {
        "orders": n,
        "completed_rate": window.rate(),
        "window_s": window.t90[0] - window.t10[0] if window.t10 else None,
        "cpu_us_per_order": cost.us_per_order if cost else {},
        "cpu_percent": cost.percent if cost else {},
        "cpu_other_us_per_order": cost.other_us_per_order if cost else None,
        "machine_percent": cost.machine_percent if cost else None,
    }


# -- the peer ----------------------------------------------------------------------------------


class Peer:
    """The Dramatiq peer for one round: fresh database and vhost, the fake, ``dramatiq -p P -t T``."""

    def __init__(self, args: Any, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.exe = dramatiq_cli()

    def prepare(self, preload_n: int | None) -> None:
        self.fake, fake_url = start_fake(self.args.latency_ms, self.tmp / "stripe.log")
        self.procs.append(self.fake)
        self.settings = load_settings(environ={"ORDERS_ENVIRONMENT": "development", **os.environ})
        vhost = harness.private_vhost_or_default(PEER_VHOST) or "/"
        self.database = fresh_peer_database(self.settings, PEER_DB)
        self.env = peer_env(self.settings, vhost, self.database, PEER_STRIPE_BASE=fake_url)
        self.url = self.env["PEER_AMQP"]
        done = subprocess.run(
            [sys.executable, "peer_paid_dramatiq.py", str(preload_n) if preload_n else "--schema-only"],
            cwd=PEERS_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise BenchError(f"the peer's preparation failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
        self.db = psycopg2.connect(self.database.dsn, connect_timeout=5, application_name="bench-poll")
        self.db.autocommit = True

    def start_workers(self) -> None:
        self.workers = Proc(
            "dramatiq",
            [self.exe, "peer_paid_dramatiq", "-p", str(self.args.processes), "-t", str(self.args.peer_threads)]
            + ["--worker-shutdown-timeout", "5000"],
            self.env,
            self.tmp / "peer.log",
            cwd=PEERS_DIR,
            say=say,
        )
        self.procs.append(self.workers)

    def components(self) -> dict[str, benchkit.GroupFinder]:
        return service_components(
            self.settings,
            {"workers": benchkit.tree(self.workers.pid), "stripe fake": benchkit.tree(self.fake.pid)},
            database=PEER_DB,
        )

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise BenchError(f"{p.name} exited with {p.returncode}:\n{p.tail()}")

    def completed(self) -> int:
        with self.db.cursor() as cur:
            cur.execute("SELECT count(*) FROM peer_orders WHERE status = 'completed'")
            return int(cur.fetchone()[0])

    def completed_rows(self) -> dict[str, float]:
        with self.db.cursor() as cur:
            cur.execute("SELECT order_id::text, extract(epoch FROM at)::float8 FROM peer_payments")
            return dict(cur.fetchall())

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=15)
        if getattr(self, "db", None) is not None:
            self.db.close()
        if getattr(self, "url", None):
            try:
                purge(self.url, [PEER_QUEUE])
            except Exception:  # noqa: BLE001 - best effort
                pass


def peer_saturation(args: Any, tmp: Path) -> dict[str, Any]:
    deadline = Deadline(args.timeout)
    peer = Peer(args, tmp)
    try:
        n = args.orders
        say(f"peer: preloading {n} card orders (latency of the fake {args.latency_ms:g} ms) ...")
        peer.prepare(n)
        before = shared_servers_before(peer.settings)
        peer.start_workers()
        meter = component_meter(peer.components())
        result = saturate(n, deadline, meter, peer.completed, peer.check_alive, PEER_TOTAL, "the peer completing")
        result["before_run_percent"] = before
        return result
    finally:
        peer.close()


# -- open loop ---------------------------------------------------------------------------------


def _generate(kind: str, payloads: list[Any], rate: float, t_start: float, env: dict[str, str], out: Any) -> None:
    """In a child process: publish payload i at ``t_start + i / rate`` (wall clock); report how late it ran."""
    late: list[float] = []
    try:
        if kind == "ours":
            conn = pika.BlockingConnection(connection_parameters(env["ORDERS_RABBITMQ__URL"], 60))
            ch = conn.channel()

            def send(o: dict[str, Any]) -> None:
                ch.basic_publish(
                    COMMANDS_EXCHANGE,
                    COMMAND_QUEUES["orders.place"],
                    json.dumps(o["body"], separators=(",", ":")).encode(),
                    pika.BasicProperties(
                        message_id=o["message_id"],
                        type="PlaceOrder",
                        content_type="application/json",
                        delivery_mode=2,
                    ),
                )
        else:
            os.environ.update(env)
            sys.path.insert(0, str(PEERS_DIR))
            import peer_paid_dramatiq  # the actor, its broker from PEER_AMQP

            def send(o: dict[str, Any]) -> None:
                peer_paid_dramatiq.place_and_pay.send(o)

        for i, payload in enumerate(payloads):
            due = t_start + i / rate
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            send(payload)
            late.append(time.time() - due)
        if kind == "ours":
            conn.close()
        out.put({"late_p99_ms": benchkit.percentile(late, 99) * 1000, "late_max_ms": max(late) * 1000})
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        out.put({"error": repr(exc)})


def open_loop(
    side: str,
    rate: float,
    payloads: list[Any],
    ids: list[str],
    env: dict[str, str],
    meter: benchkit.CpuMeter,
    completed: Any,
    check: Any,
    total_of: tuple[str, ...],
    grace: float,
) -> dict[str, Any]:
    """Offer ``payloads`` at ``rate``; wait up to ``grace`` s after the last for them to complete."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    t_start = time.time() + 1.0
    gen = ctx.Process(target=_generate, args=(side, payloads, rate, t_start, env, out), daemon=True)
    gen.start()
    duration = len(payloads) / rate
    warm = min(WARMUP_S, duration / 4)
    snaps: dict[str, Any] = {}
    counts: dict[str, int] = {}
    try:
        while time.time() < t_start + warm:
            check()
            time.sleep(0.2)
        snaps["a"], counts["a"] = meter.snapshot(), completed()
        while time.time() < t_start + duration:
            check()
            time.sleep(0.2)
        snaps["b"], counts["b"] = meter.snapshot(), completed()
        report = out.get(timeout=60)
        gen.join(10)
        if "error" in report:
            raise BenchError(f"the load generator failed: {report['error']}")
        end = time.monotonic() + grace
        while completed() < len(payloads) and time.monotonic() < end:
            check()
            time.sleep(0.5)
    finally:
        if gen.is_alive():
            gen.terminate()
    done_in_window = counts["b"] - counts["a"]
    cost = benchkit.cpu_cost(snaps["a"], snaps["b"], done_in_window, total_of)
    due = {oid: t_start + i / rate for i, oid in enumerate(ids)}
    return {
        "offered_per_s": rate,
        "seconds": duration,
        "orders": len(ids),
        "completed_per_s": done_in_window / max(1e-9, cost.seconds),
        "cpu_us_per_order": cost.us_per_order,
        "cpu_percent": cost.percent,
        "machine_percent": cost.machine_percent,
        "generator": report,
        "_due": due,
        "_judged_from": t_start + warm,
    }


def latencies(due: dict[str, float], done_at: dict[str, float], judged_from: float) -> dict[str, Any]:
    """Latency summary of the orders scheduled after the warm-up (incomplete ones counted apart)."""
    judged = [oid for oid, t in due.items() if t >= judged_from]
    seconds = [done_at[oid] - due[oid] for oid in judged if oid in done_at]
    summary: dict[str, Any] = benchkit.latency_summary(seconds)
    summary["incomplete"] = sum(1 for oid in judged if oid not in done_at)
    return summary


#: --stages: each stage of an order's latency, from one moment to the next
STAGES = (
    ("published → placed", "due", "placed"),
    ("placed → payment.start published", "placed", "start"),
    ("payment.start → completed row", "start", "completed"),
    ("completed row → order.completed consumed", "completed", "event"),
)


def stages(
    due: dict[str, float],
    judged_from: float,
    placed: dict[str, float],
    start: dict[str, float],
    completed: dict[str, float],
    event: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Median and p90 (ms) of each of :data:`STAGES` over the judged orders that passed every moment.  The
    transactions' times are their starts (``now()``): a stage that ends at one holds none of its statements,
    the next all of them."""
    moments = {"due": due, "placed": placed, "start": start, "completed": completed, "event": event}
    judged = [oid for oid, t in due.items() if t >= judged_from and all(oid in m for m in moments.values())]
    out: dict[str, dict[str, Any]] = {}
    for name, a, b in STAGES:
        ms = [(moments[b][oid] - moments[a][oid]) * 1000 for oid in judged]
        out[name] = {"orders": len(ms), "p50_ms": benchkit.percentile(ms, 50), "p90_ms": benchkit.percentile(ms, 90)}
    return out


def ours_latency(args: Any, tmp: Path, rate: float) -> dict[str, Any]:
    ours = Ours(args, tmp)
    try:
        ours.prepare()
        ours.start_stack()
        harness.wait_until(lambda: ours.pool.children(), timeout=60, what="the worker pool's processes")
        time.sleep(3)  # the pool's processes and the relay connect (not measured)
        n = max(1, int(rate * args.seconds))
        orders = ours.orders(n)
        ids = [o["body"]["order_id"] for o in orders]
        say(f"ours: {n} card orders offered at {rate:.0f}/s for {args.seconds:g} s (fake {args.latency_ms:g} ms) ...")
        result = open_loop(
            "ours",
            rate,
            orders,
            ids,
            ours.env,
            component_meter(ours.components()),
            lambda: ours.counts()[0],
            ours.check_alive,
            SERVICE_TOTAL,
            args.grace,
        )
        assert ours.capture is not None
        time.sleep(1)  # the last order.completed in flight
        due, since = result.pop("_due"), result.pop("_judged_from")
        result["to_event"] = latencies(due, dict(ours.capture.at), since)
        completed_at = ours.completed_rows()
        result["to_row"] = latencies(due, completed_at, since)
        if args.stages:
            result["stages"] = stages(
                due, since, ours.placed_rows(), dict(ours.capture.starts), completed_at, dict(ours.capture.at)
            )
        result["rejected"] = ours.counts()[1]
        return result
    finally:
        ours.close()


def peer_latency(args: Any, tmp: Path, rate: float) -> dict[str, Any]:
    peer = Peer(args, tmp)
    try:
        peer.prepare(None)
        peer.start_workers()
        time.sleep(3)  # the workers connect (not measured)
        n = max(1, int(rate * args.seconds))
        if str(PEERS_DIR) not in sys.path:
            sys.path.insert(0, str(PEERS_DIR))
        common = importlib.import_module("common")  # the peers' own command generator
        cmds = [common.command(i) for i in range(n)]
        ids = [c["order_id"] for c in cmds]
        say(f"peer: {n} card orders offered at {rate:.0f}/s for {args.seconds:g} s (fake {args.latency_ms:g} ms) ...")
        result = open_loop(
            "peer",
            rate,
            cmds,
            ids,
            peer.env,
            component_meter(peer.components()),
            peer.completed,
            peer.check_alive,
            PEER_TOTAL,
            args.grace,
        )
        due, since = result.pop("_due"), result.pop("_judged_from")
        result["to_row"] = latencies(due, peer.completed_rows(), since)
        return result
    finally:
        peer.close()


# -- report ----------------------------------------------------------------------------------


def saturation_rounds(args: Any, tmp: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
    sides = ["ours"] if args.no_peer else ["ours", "peer"]
    for i in range(args.rounds):
        for side in sides if i % 2 == 0 else list(reversed(sides)):
            say(f"saturation round {i + 1}/{args.rounds}: {side}")
            run = ours_saturation if side == "ours" else peer_saturation
            runs[side].append(run(args, tmp / f"sat-{side}-{i + 1}"))
    out: dict[str, Any] = {"runs": runs}
    for side in sides:
        out[f"{side}_rates"] = [r["completed_rate"] for r in runs[side]]
        out[f"{side}_median"] = benchkit.median(out[f"{side}_rates"])
        out[f"{side}_us_per_order_median"] = benchkit.median_costs(
            [r["cpu_us_per_order"] for r in runs[side] if r["cpu_us_per_order"]]
        )
    out["ratio"] = benchkit.ratio(out.get("ours_median"), out.get("peer_median"))
    return out


def latency_points(args: Any, tmp: Path, saturation: dict[str, float]) -> list[dict[str, Any]]:
    points = []
    sides = [s for s in ("ours", "peer") if saturation.get(s)]
    for i, fraction in enumerate(args.fractions):
        for side in sides if i % 2 == 0 else list(reversed(sides)):
            rate = fraction * saturation[side]
            run = ours_latency if side == "ours" else peer_latency
            result = run(args, tmp / f"lat-{side}-{fraction}", rate)
            points.append({"side": side, "fraction": fraction, **result})
    return points


def report(args: Any, result: dict[str, Any]) -> str:
    lines = [
        f"paid path, Stripe fake answering in {args.latency_ms:g} ms; worker processes {args.processes}"
        + ("" if args.no_peer else f", peer {args.processes} x {args.peer_threads} threads")
        + f"; {result['machine']} (at the start)",
    ]
    sat = result.get("saturation")
    if sat:
        peer = "ours" if args.no_peer else "peer"
        lines += [
            "",
            f"saturation: {args.orders} card orders preloaded, completed orders/s from 10 % to 90 %, "
            f"{args.rounds} round(s), who goes first alternating",
            "",
            "| round | ours | peer (Dramatiq) |" if not args.no_peer else "| round | ours |",
            "|---:|---:|---:|" if not args.no_peer else "|---:|---:|",
        ]
        for i, rate in enumerate(sat["ours_rates"]):
            row = f"| {i + 1} | {fmt_rate(rate)} |"
            if not args.no_peer:
                rates = sat["peer_rates"]
                row += f" {fmt_rate(rates[i] if i < len(rates) else None)} |"
            lines.append(row)
        row = f"| median | **{fmt_rate(sat['ours_median'])}** |"
        if not args.no_peer:
            row += f" **{fmt_rate(sat['peer_median'])}** |"
        lines += [row, ""]
        if not args.no_peer:
            lines.append(f"ours / peer: {benchkit.fmt(sat['ratio'], '.2f')} (medians)")
        for side in ["ours"] + ([] if args.no_peer else ["peer"]):
            before = [r.get("before_run_percent", {}) for r in sat["runs"][side]]
            lines.append(
                f"before each {side} run (the neighbours, % of a core): "
                + "; ".join(", ".join(f"{k} {v:.0f}" for k, v in b.items()) for b in before)
            )
        lines.append("CPU µs per completed order, 10-90 %, medians (the Stripe fake apart, not in the total):")
        lines.append(f"  ours: {cost_line(sat['ours_us_per_order_median'])}")
        if peer == "peer":
            lines.append(f"  peer: {cost_line(sat['peer_us_per_order_median'])}")
    pts = result.get("latency")
    if pts:
        lines += [
            "",
            f"latency: open-loop, {args.seconds:g} s per point (the first {WARMUP_S:g} s not judged), "
            f"from the scheduled publish; ours to order.completed consumed (to the completing row in brackets), "
            f"the peer to its completing row",
            "",
            "| side | offered/s | completed/s | p50 ms | p90 ms | p99 ms | p99.9 ms | incomplete | CPU µs/order (total) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in pts:
            main = p["to_event"] if p["side"] == "ours" else p["to_row"]
            row_ms = p["to_row"]

            def cell(
                key: str, main: dict[str, Any] = main, row_ms: dict[str, Any] = row_ms, side: str = p["side"]
            ) -> str:
                text = benchkit.fmt(main[key], ".1f")
                return text + (f" ({benchkit.fmt(row_ms[key], '.1f')})" if side == "ours" else "")

            lines.append(
                f"| {p['side']} at {p['fraction']:.0%} | {p['offered_per_s']:.0f} | {p['completed_per_s']:.0f} | "
                f"{cell('p50_ms')} | {cell('p90_ms')} | {cell('p99_ms')} | {cell('p999_ms')} | "
                f"{main['incomplete']} | {p['cpu_us_per_order'].get('total', 0):.0f} |"
            )
        for p in pts:
            if p.get("stages"):
                lines += ["", f"where ours at {p['fraction']:.0%} waited (--stages; ms, p50 / p90):", ""]
                lines += [f"  {name}: {v['p50_ms']:.1f} / {v['p90_ms']:.1f}" for name, v in p["stages"].items()]
        late = max(p["generator"].get("late_max_ms", 0) for p in pts)
        lines.append(f"\n(the load generator ran at most {late:.1f} ms behind its schedule)")
    return "\n".join(lines)


def fmt_rate(v: float | None) -> str:
    return benchkit.fmt(v, ",.0f")


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", choices=("all", "saturation", "latency"), default="all")
    ap.add_argument("--orders", type=int, default=5000, help="card orders preloaded per saturation round (5000)")
    ap.add_argument("--rounds", type=int, default=3, help="saturation rounds of each side (default 3)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="the Stripe fake's answer time (default 0)")
    ap.add_argument("--processes", type=int, default=2, help="worker processes, ours and the peer's (default 2)")
    ap.add_argument("--peer-threads", type=int, default=8, help="threads per peer process (default 8)")
    ap.add_argument("--no-peer", action="store_true", help="measure ours alone")
    ap.add_argument(
        "--fractions",
        default="0.5,0.8",
        type=lambda s: [float(x) for x in s.split(",") if x.strip()],
        help="open-loop rates as fractions of each side's saturation (default 0.5,0.8)",
    )
    ap.add_argument(
        "--saturation",
        default="",
        help="OURS[,PEER] completed orders/s to take the fractions of, instead of measuring them (--mode latency)",
    )
    ap.add_argument("--seconds", type=float, default=60, help="seconds of offered load per latency point (60)")
    ap.add_argument("--grace", type=float, default=60, help="seconds to wait for the last orders (60)")
    ap.add_argument(
        "--capture-queue", choices=("quorum", "classic"), default="quorum", help="order.completed queue type"
    )
    ap.add_argument(
        "--stages", action="store_true", help="latency: split ours into its stages (a copy of payment.start captured)"
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--timeout", type=float, default=900, help="give up a saturation round after this (900 s)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path printed)")
    args = ap.parse_args(argv)
    if args.mode == "latency" and not args.saturation:
        ap.error("--mode latency needs --saturation OURS[,PEER] (or use --mode all)")
    if not args.no_peer:
        try:
            dramatiq_cli()
        except BenchError as exc:
            ap.error(f"{exc} (or --no-peer)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-paid-"))
    signal.signal(signal.SIGTERM, _interrupt)
    result: dict[str, Any] = {"machine": benchkit.machine_line(), "latency_ms": args.latency_ms}
    try:
        say(f"logs in {tmp}")
        saturation: dict[str, float] = {}
        if args.mode in ("all", "saturation"):
            result["saturation"] = sat = saturation_rounds(args, tmp)
            saturation = {k: sat[f"{k}_median"] for k in ("ours", "peer") if sat.get(f"{k}_median")}
        if args.saturation:
            given = [float(x) for x in args.saturation.split(",")]
            saturation = {"ours": given[0], **({"peer": given[1]} if len(given) > 1 and not args.no_peer else {})}
        if args.mode in ("all", "latency"):
            result["latency"] = latency_points(args, tmp, saturation)
        result["machine_after"] = benchkit.machine_line()
        print(json.dumps(result, indent=2, default=str) if args.json else report(args, result))
        return 0
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if args.keep_logs:
            say(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
