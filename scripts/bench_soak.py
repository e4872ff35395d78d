#!/usr/bin/env python3
"""A soak of the whole paid path: card orders at a steady rate for a long time (a benchmark, not a test).

Offers card orders open-loop at ``--rate`` (default: ``--fraction`` 0.8 of the
``--saturation`` you pass, completed orders/s from ``scripts/bench_paid.py``)
for ``--minutes`` (default 30), through the HTTP shim (``POST /orders``, 2
uvicorn workers; ``--via amqp`` publishes upstream PlaceOrders to
``orders.commands`` instead and leaves the shim idle), paid through the Stripe
fake (``--latency-ms``), until ``order.completed`` is consumed from a queue
bound to ``orders.events``.  Every ``--interval`` seconds (default 5) it samples:

* the backlog: orders offered and not yet completed, the depth of every work
  queue (commands, ``orders.payments``, the delay queues, the dead letters)
  and the outbox rows not yet published;
* RSS of the worker processes, the relay and the shim (each a sum over its
  processes);
* the relay's poll: the relay has no metric of it, so it is timed from
  outside.  The relay's own PostgreSQL connections are found from ``/proc``
  (their client ports), the last statement they ran that reads the outbox is
  taken from ``pg_stat_activity`` (psycopg2 sends parameters inline, so it is
  the statement as run, whatever the relay's code is then), and that
  statement, without its row-locking clause so that it locks nothing the relay
  wants, runs under ``EXPLAIN (ANALYZE, BUFFERS)``: execution time and buffers
  visited.  Its keyset bound (``id > N``) is moved to where the relay's floor
  is now: the statement seen may be seconds old, and run again from its old
  bound it would walk every row published and deleted since, which the
  relay's next poll does not (the first soak of the keyset relay counted
  those as the poll's buffers).  The locking clause only locks the rows returned; the cost that
  grows with dead rows is the scan, which is the same.  Beside it the CPU of
  the relay's backends, the dead rows of ``outbox`` and ``orders``
  (``pg_stat_user_tables``) and the autovacuum workers at work;
* completed orders/s and the p99 latency (scheduled send → ``order.completed``)
  of the orders completed in the interval, and the CPU of each component.

At the end: the table, and a verdict.  After a warm-up (a fifth of the run, at
most 60 s), the backlog is *bounded* when it never exceeds ``--backlog-seconds``
(10) of offered load and its least-squares trend adds less than 2 s of load over
the judged time; RSS is *flat* when the median of the last fifth of the samples
is within ``--rss-tolerance`` (10 %) of the median of the first fifth, for each
of worker, relay and shim; the poll is *flat* when the same medians of its time
grow by at most ``--poll-tolerance`` (50 %) plus 1 ms, and those of the buffers
it visits (the same cost without the machine's noise) by at most that plus 100.
The backlog judged is the orders offered and not yet completed (whatever of
them waits in a queue or the outbox); queue depths and outbox rows are in the
table.  Exit code 0 when all three hold, 3 when one does not.

Usage::

    .venv/bin/python scripts/bench_soak.py --saturation 80 --minutes 30
    .venv/bin/python scripts/bench_soak.py --rate 60 --minutes 2 --interval 5
    .venv/bin/python scripts/bench_soak.py --saturation 470 --autovacuum on   # as a production server runs

The rate to take 80 % of is the saturation *through this harness* (its load
generator and its capture of every ``order.completed`` share the machine): offer
more than the stack can take for a few minutes (``--rate 650 --minutes 4``) and
read the completed orders/s it settles at.  ``bench_paid.py``'s saturation, with
its orders preloaded, pays for neither and is higher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schema.topology import DEAD_LETTER_QUEUE, WORK_QUEUES, delay_queue  # noqa: E402
from scripts import benchkit, harness  # noqa: E402
from scripts.bench_drain import BenchError, component_meter, make_orders, products_for_bench, say  # noqa: E402
from scripts.bench_paid import Ours, _generate  # noqa: E402
from scripts.benchkit import without_locking  # noqa: E402
from scripts.harness import Proc  # noqa: E402

SOAK_DB, SOAK_VHOST = "orders_bench_soak", "orders-bench-soak"
#: the component of the relay's PostgreSQL backends
RELAY_PG = "relay's backends"
#: the relay's poll as the relay runs it today: timed when no statement of the relay's was seen yet
POLL_SQL = (
    "SELECT id, event_id::text, exchange, routing_key, message_type, correlation_id, body,"
    " extract(epoch from created_at)::float8 AS created, traceparent FROM outbox WHERE published_at IS NULL"
    " ORDER BY id LIMIT 1000"
)
# -- the load: POST /orders through the shim, open-loop -----------------------------------------


def _post_orders(url: str, token: str, bodies: list[dict[str, Any]], rate: float, t_start: float, out: Any) -> None:
    """In a child process: POST body i at ``t_start + i / rate`` over keep-alive connections; count the answers."""
    from scripts.bench_http import _Connections

    host, port = url.split("//")[1].split(":")

    def raw(body: dict[str, Any]) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode()
        head = (
            f"POST /orders HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        return head.encode() + data

    async def offer() -> dict[str, Any]:
        pool = _Connections(host, int(port), 300)
        statuses: dict[str, int] = {}

        async def one(body: dict[str, Any]) -> None:
            try:
                status = await asyncio.wait_for(pool.request(raw(body)), 30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                status = 0
            statuses[str(status)] = statuses.get(str(status), 0) + 1

        tasks = []
        for i, body in enumerate(bodies):
            wait = t_start + i / rate - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
        return {"statuses": statuses}

    try:
        out.put(asyncio.run(offer()))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        out.put({"error": repr(exc)})


# -- sampling ------------------------------------------------------------------------------------


class Sampler:
    """One row of the table per interval (see the module docstring)."""

    def __init__(self, stack: Ours, shim: Proc, rate: float, t_start: float, ids: list[str]) -> None:
        self.stack, self.shim, self.rate, self.t_start, self.ids = stack, shim, rate, t_start, ids
        self.due = {oid: t_start + i / rate for i, oid in enumerate(ids)}
        self.proc = benchkit.ProcFS()
        settings = stack.settings
        pg = [benchkit.Server(p) for _, p in settings.database.nodes]
        relay_tree = benchkit.tree(stack.relay.pid)

        def relay_pids() -> set[int]:
            return relay_tree(self.proc, self.proc.stats())

        self.relay_backends = pg[0].postgres_backends(stack.database, only_clients=relay_pids)
        from scripts.bench_drain import service_components

        groups = service_components(
            settings,
            {
                "workers": benchkit.tree(stack.pool.pid),
                "relay": relay_tree,
                "shim": benchkit.tree(shim.pid),
                "stripe fake": benchkit.tree(stack.fake.pid),
            },
        )
        groups[RELAY_PG] = self.relay_backends
        self.meter = component_meter(groups)
        self.last = self.meter.snapshot()
        self.last_completed = 0
        self.poll_sql = POLL_SQL
        self.poll_sql_seen = False
        self.queues = [*WORK_QUEUES, *(delay_queue(s) for s in settings.worker.retry_delays_seconds)]
        self.queues.append(DEAD_LETTER_QUEUE)
        self.rows: list[dict[str, Any]] = []

    def rss_mib(self, pid: int) -> float:
        stats = self.proc.stats()
        return sum(self.proc.rss_kib(p) for p in benchkit.descendants(pid, stats)) / 1024

    def relay_statement(self) -> None:
        """The relay's last statement that reads the outbox, when one of its backends shows it."""
        stats = self.proc.stats()
        pids = list(self.relay_backends(self.proc, stats))
        if not pids:
            return
        with self.stack.db.cursor() as cur:
            cur.execute("SELECT query FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            for (query,) in cur.fetchall():
                q = (query or "").strip()
                if q.upper().startswith("SELECT") and re.search(r"\bFROM\s+outbox\b.*\bORDER BY id\b", q, re.I | re.S):
                    self.poll_sql, self.poll_sql_seen = without_locking(q), True

    def from_the_floor(self, cur: Any) -> str:
        """The poll seen, its keyset bound moved up to the relay's floor as it is now: below the first
        unpublished row (none: the sequence's last id).  The relay may hold its floor lower a moment, for a
        transaction still writing below it; it never goes back down."""
        bound = re.search(r"\bid > (\d+)", self.poll_sql)
        if bound is None:  # the poll without a keyset (a relay before issue 25)
            return self.poll_sql
        seen = int(bound.group(1))
        cur.execute("SELECT min(id) FROM outbox WHERE id > %s AND published_at IS NULL", (seen,))
        first = cur.fetchone()[0]
        if first is None:
            cur.execute("SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('outbox', 'id')::regclass), 0)")
            floor = int(cur.fetchone()[0])
        else:
            floor = int(first) - 1
        return self.poll_sql[: bound.start(1)] + str(max(seen, floor)) + self.poll_sql[bound.end(1) :]

    def poll_timing(self) -> tuple[float, int]:
        """(ms, buffers) of the relay's poll statement under EXPLAIN ANALYZE, from the relay's floor."""
        with self.stack.db.cursor() as cur:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + self.from_the_floor(cur))
            plan = cur.fetchone()[0][0]
        top = plan["Plan"]
        return float(plan["Execution Time"]), int(top.get("Shared Hit Blocks", 0)) + int(
            top.get("Shared Read Blocks", 0)
        )

    def sample(self) -> dict[str, Any]:
        now = time.time()
        t = now - self.t_start
        completed_at = dict(self.stack.capture.at) if self.stack.capture else {}
        completed = len(completed_at)
        offered = max(0, min(len(self.ids), int(t * self.rate) + 1)) if t >= 0 else 0
        depths = harness.queue_depths(self.stack.url, self.queues)
        with self.stack.db.cursor() as cur:
            cur.execute(
                "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL),"
                " (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'outbox'),"
                " (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'orders'),"
                " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker')"
            )
            unpublished, dead, orders_dead, vacuuming = cur.fetchone()
        self.relay_statement()
        poll_ms, poll_buffers = self.poll_timing()
        snap = self.meter.snapshot()
        cost = benchkit.cpu_cost(self.last, snap, max(1, completed - self.last_completed), ())
        interval_s = snap.t - self.last.t
        # the p99 of the orders completed in this interval, from their scheduled send
        since = now - interval_s
        lat = [at - self.due[oid] for oid, at in completed_at.items() if at > since and oid in self.due]
        row = {
            "t_s": round(t, 1),
            "offered": offered,
            "completed": completed,
            "in_flight": max(0, offered - completed),
            "completed_per_s": (completed - self.last_completed) / max(1e-9, interval_s),
            "p99_ms": benchkit.percentile(lat, 99) * 1000 if lat else float("nan"),
            "queues": sum(depths.values()),
            "queue_depths": {q: d for q, d in depths.items() if d},
            "outbox_unpublished": int(unpublished),
            "outbox_dead": int(dead or 0),
            "orders_dead": int(orders_dead or 0),
            "autovacuum_workers": int(vacuuming or 0),
            "poll_ms": poll_ms,
            "poll_buffers": poll_buffers,
            "rss_mib": {
                "worker": self.rss_mib(self.stack.pool.pid),
                "relay": self.rss_mib(self.stack.relay.pid),
                "shim": self.rss_mib(self.shim.pid),
            },
            "cpu_percent": {k: round(v, 1) for k, v in cost.percent.items()},
            "machine_percent": round(cost.machine_percent, 1),
        }
        self.last, self.last_completed = snap, completed
        self.rows.append(row)
        return row


def judge(rows: list[dict[str, Any]], rate: float, args: Any, minutes: float) -> dict[str, Any]:
    """The verdict over the samples after the warm-up (see the module docstring)."""
    warm = min(60.0, minutes * 60 / 5)
    judged = [r for r in rows if r["t_s"] >= warm and r["t_s"] <= minutes * 60]
    if len(judged) < 5:
        return {"error": f"only {len(judged)} samples after the {warm:.0f} s warm-up: run longer or sample more often"}
    k = max(1, len(judged) // 5)
    head, tail = judged[:k], judged[-k:]

    def med(rs: list[dict[str, Any]], f: Any) -> float:
        return float(benchkit.median(f(r) for r in rs) or 0.0)

    backlog = [(r["t_s"], r["in_flight"]) for r in judged]
    span = judged[-1]["t_s"] - judged[0]["t_s"]
    growth = benchkit.slope(backlog) * span
    peak = max(b for _, b in backlog)
    bounded = peak <= args.backlog_seconds * rate and growth <= 2 * rate
    rss = {}
    for name in ("worker", "relay", "shim"):
        first, last = med(head, lambda r, n=name: r["rss_mib"][n]), med(tail, lambda r, n=name: r["rss_mib"][n])
        drift = 100 * (last - first) / first if first else 0.0
        rss[name] = {"first_mib": first, "last_mib": last, "drift_pct": drift, "flat": abs(drift) <= args.rss_tolerance}
    p_first, p_last = med(head, lambda r: r["poll_ms"]), med(tail, lambda r: r["poll_ms"])
    b_first, b_last = med(head, lambda r: r["poll_buffers"]), med(tail, lambda r: r["poll_buffers"])
    # the time is what the relay pays; the buffers visited are the same thing without the machine's noise
    grow = 1 + args.poll_tolerance / 100
    poll_flat = p_last <= p_first * grow + 1.0 and b_last <= b_first * grow + 100
    return {
        "warmup_s": warm,
        "samples_judged": len(judged),
        "backlog": {"peak": peak, "growth_over_run": growth, "limit": args.backlog_seconds * rate, "bounded": bounded},
        "rss": rss,
        "poll": {
            "first_ms": p_first,
            "last_ms": p_last,
            "first_buffers": b_first,
            "last_buffers": b_last,
            "flat": poll_flat,
        },
        "ok": bounded and all(v["flat"] for v in rss.values()) and poll_flat,
    }


def table(rows: list[dict[str, Any]], most: int = 60) -> str:
    """The samples, at most ``most`` of them evenly spaced (the last one always; ``--json`` has them all)."""
    step = max(1, -(-len(rows) // most))
    rows = [r for i, r in enumerate(rows) if i % step == 0 or i == len(rows) - 1]
    lines = [
        "| t s | offered | completed/s | p99 ms | in flight | queues | outbox | dead | orders dead | vacuuming "
        "| poll ms | poll buf | worker MiB | relay MiB | shim MiB | relay's pg % | machine % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['t_s']:.0f} | {r['offered']} | {r['completed_per_s']:.0f} | {benchkit.fmt(r['p99_ms'])} | "
            f"{r['in_flight']} | {r['queues']} | {r['outbox_unpublished']} | {r['outbox_dead']} | "
            f"{r['orders_dead']} | {r['autovacuum_workers']} | {r['poll_ms']:.1f} | {r['poll_buffers']} | {r['rss_mib']['worker']:.1f} | "
            f"{r['rss_mib']['relay']:.1f} | {r['rss_mib']['shim']:.1f} | "
            f"{r['cpu_percent'].get(RELAY_PG, 0):.0f} | {r['machine_percent']:.0f} |"
        )
    return "\n".join(lines)


def verdict_lines(v: dict[str, Any], rate: float) -> list[str]:
    if "error" in v:
        return [f"verdict: {v['error']}"]
    b, p = v["backlog"], v["poll"]
    yes = {True: "yes", False: "NO"}
    lines = [
        f"verdict over {v['samples_judged']} samples after a {v['warmup_s']:.0f} s warm-up:",
        f"  backlog bounded: {yes[b['bounded']]} (orders offered and not completed: peak {b['peak']:.0f} = "
        f"{b['peak'] / rate:.1f} s of load, limit {b['limit']:.0f}; trend {b['growth_over_run']:+.0f} over the run)",
    ]
    for name, r in v["rss"].items():
        lines.append(
            f"  {name} RSS flat: {yes[r['flat']]} ({r['first_mib']:.1f} → {r['last_mib']:.1f} MiB, {r['drift_pct']:+.1f} %)"
        )
    lines.append(
        f"  relay poll flat: {yes[p['flat']]} ({p['first_ms']:.2f} → {p['last_ms']:.2f} ms, "
        f"{p['first_buffers']:.0f} → {p['last_buffers']:.0f} buffers; medians of the first and last fifth)"
    )
    lines.append(f"  => {'PASS' if v['ok'] else 'FAIL'}")
    return lines


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


class Autovacuum:
    """``--autovacuum on``: the server's autovacuum switched on for the run, as a production server runs.

    This machine's PostgreSQL runs with ``autovacuum = off`` (a test server's setting), so a long soak
    measures tables that only grow dead rows, and the per-table settings of migration 0007 never act.
    ``ALTER SYSTEM SET autovacuum = on`` and a reload switch it on without a restart (the setting is
    read at reload); at the end ``ALTER SYSTEM RESET`` and a reload give the server back its own
    configuration. Needs a superuser, as this machine's trust-authenticated ``postgres`` is."""

    def __init__(self, switch_on: bool) -> None:
        self.switch_on = switch_on
        self.dsn: str | None = None
        self.described = "as the server has it"
        self.switched = False

    def _run(self, *statements: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.dsn, connect_timeout=5, application_name="bench-soak-autovacuum")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
                cur.execute("SHOW autovacuum")
                return str(cur.fetchone()[0])
        finally:
            conn.close()

    def start(self, dsn: str) -> None:
        self.dsn = dsn
        was = self._run()
        self.described = f"{was} (as the server has it)"
        if not self.switch_on or was == "on":
            return
        try:
            now = self._run("ALTER SYSTEM SET autovacuum = on", "SELECT pg_reload_conf()")
        except Exception as exc:  # noqa: BLE001 - said plainly: the soak needs the switch it was asked for
            raise BenchError(f"--autovacuum on: could not switch it on ({exc}); run as a superuser") from None
        self.switched = True  # from here on the server's setting is ours to reset, whatever follows
        for _ in range(50):  # the reload is asynchronous: the new setting is seen by sessions started after it
            if now == "on":
                break
            time.sleep(0.1)
            now = self._run()
        self.described = f"{now} (switched on for the run; the server had {was})"

    def restore(self) -> None:
        if self.switched:
            self._run("ALTER SYSTEM RESET autovacuum", "SELECT pg_reload_conf()")
            self.switched = False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--saturation", type=float, help="completed orders/s at saturation (scripts/bench_paid.py)")
    ap.add_argument("--fraction", type=float, default=0.8, help="of --saturation to offer (default 0.8)")
    ap.add_argument("--rate", type=float, help="orders/s to offer (instead of --saturation x --fraction)")
    ap.add_argument("--minutes", type=float, default=30, help="minutes of load (default 30)")
    ap.add_argument("--interval", type=float, default=5, help="seconds between samples (default 5)")
    ap.add_argument("--via", choices=("shim", "amqp"), default="shim", help="POST /orders (default) or upstream")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="the Stripe fake's answer time (default 0)")
    ap.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--shim-workers", type=int, default=2, help="uvicorn workers of the shim (default 2)")
    ap.add_argument("--backlog-seconds", type=float, default=10, help="bounded: backlog under this much load (10)")
    ap.add_argument("--rss-tolerance", type=float, default=10, help="flat RSS: within this many percent (10)")
    ap.add_argument("--poll-tolerance", type=float, default=50, help="flat poll time: within this many percent (50)")
    ap.add_argument("--capture-queue", choices=("quorum", "classic"), default="quorum")
    ap.add_argument(
        "--autovacuum",
        choices=("as-is", "on"),
        default="as-is",
        help="on: switch the server's autovacuum on for the run (ALTER SYSTEM, reset at the end; superuser)",
    )
    ap.add_argument("--json", action="store_true", help="print the samples and the verdict as JSON")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args(argv)
    rate = args.rate or (args.saturation * args.fraction if args.saturation else None)
    if not rate or rate <= 0:
        ap.error("give --saturation (completed orders/s from scripts/bench_paid.py) or --rate")

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    signal.signal(signal.SIGTERM, _interrupt)
    stack = Ours(args, tmp, database=SOAK_DB, vhost=SOAK_VHOST)
    gen: Any = None
    autovacuum = Autovacuum(args.autovacuum == "on")
    try:
        machine = benchkit.machine_line()
        say(f"soak: {rate:.0f} orders/s for {args.minutes:g} min via {args.via}; logs in {tmp}; {machine}")
        stack.prepare()
        autovacuum.start(stack.settings.database.dsn)
        stack.start_stack()
        from worker.shim.auth import issue_token

        shim_port = harness.free_port()
        big = "1000000000"
        shim_env = {
            **stack.env,
            **{
                f"ORDERS_SHIM__{k}": big
                for k in (
                    "PLACE_RATE_PER_MINUTE",
                    "READ_RATE_PER_MINUTE",
                    "PLACE_RATE_PER_MINUTE_PER_ADDRESS",
                    "READ_RATE_PER_MINUTE_PER_ADDRESS",
                )
            },
        }
        shim = Proc.orders(
            ["shim", "--port", str(shim_port), "--workers", str(args.shim_workers)], shim_env, tmp / "shim.log"
        )
        stack.procs.append(shim)
        from scripts.bench_http import wait_healthy

        wait_healthy(f"http://127.0.0.1:{shim_port}")
        harness.wait_until(lambda: stack.pool.children(), timeout=60, what="the worker pool's processes")
        time.sleep(3)

        n = int(rate * args.minutes * 60)
        orders = make_orders(n, products_for_bench(), seed=13)
        for o in orders:
            o["body"]["order_id"] = str(uuid.uuid4())
        ids = [o["body"]["order_id"] for o in orders]
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        t_start = time.time() + 2.0
        if args.via == "shim":
            token = issue_token(stack.settings.shim, "soak", "user", int(args.minutes * 60) + 3600)
            bodies = [{k: v for k, v in o["body"].items() if k != "user_id"} for o in orders]
            target, targs = _post_orders, (f"http://127.0.0.1:{shim_port}", token, bodies, rate, t_start, out)
        else:
            target, targs = _generate, ("ours", orders, rate, t_start, stack.env, out)
        sampler = Sampler(stack, shim, rate, t_start, ids)
        gen = ctx.Process(target=target, args=targs, daemon=True)
        gen.start()
        end = t_start + args.minutes * 60
        next_at = t_start + args.interval
        while time.time() < end + args.interval / 2:
            time.sleep(max(0.0, next_at - time.time()))
            next_at += args.interval
            stack.check_alive()
            row = sampler.sample()
            say(
                f"t={row['t_s']:.0f}s completed/s {row['completed_per_s']:.0f} in flight {row['in_flight']} "
                f"queues {row['queues']} outbox {row['outbox_unpublished']} poll {row['poll_ms']:.1f} ms "
                f"RSS w/r/s {row['rss_mib']['worker']:.0f}/{row['rss_mib']['relay']:.0f}/{row['rss_mib']['shim']:.0f}"
            )
        load = out.get(timeout=120)
        if "error" in load:
            raise BenchError(f"the load generator failed: {load['error']}")
        verdict = judge(sampler.rows, rate, args, args.minutes)
        result = {
            "rate": rate,
            "minutes": args.minutes,
            "via": args.via,
            "latency_ms": args.latency_ms,
            "machine": machine,
            "machine_after": benchkit.machine_line(),
            "autovacuum": autovacuum.described,
            "poll_statement": sampler.poll_sql,
            "poll_statement_from_relay": sampler.poll_sql_seen,
            "load": load,
            "samples": sampler.rows,
            "verdict": verdict,
        }
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            print(
                f"soak: {rate:.0f} card orders/s offered via {args.via} for {args.minutes:g} min, Stripe fake "
                f"{args.latency_ms:g} ms, {args.processes} worker processes, shim {args.shim_workers} workers; "
                f"{machine} (start), {result['machine_after']} (end); autovacuum {autovacuum.described}\n"
                f"answers to the load: {load.get('statuses', 'published upstream')}; relay poll timed: "
                f"{'the relay own statement' if sampler.poll_sql_seen else 'the statement of today (none seen)'}\n"
            )
            print(table(sampler.rows))
            print()
            print("\n".join(verdict_lines(verdict, rate)))
        return 0 if verdict.get("ok") else 3
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if gen is not None and gen.is_alive():
            gen.terminate()
        stack.close()
        autovacuum.restore()
        if args.keep_logs:
            say(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
