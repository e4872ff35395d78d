"""Benchmark the HTTP shim: accepted POST /orders per second and latency at a fixed offered load.

Starts the command workers (``orders worker``, command queues only, so orders
stay ``pending`` and no payment provider is involved), the shim (``orders
shim``) and, as a baseline, a minimal FastAPI endpoint on the same uvicorn
settings; then offers each the same open-loop load (requests leave on a fixed
schedule, latency counted from the scheduled time, so a stalled server cannot
hide its queue) and measures POST→visible-through-GET for a paced sample.
Requests the shim sheds (503 ``overloaded`` with ``Retry-After``: its
concurrency limit or its Redis pool) are counted apart from errors.

    .venv/bin/python scripts/bench_http.py --rate 1000 --duration 20 --workers 2

Uses the configured PostgreSQL/RabbitMQ/Redis servers (ORDERS_* overrides
apply), but a database and a RabbitMQ vhost of its own (``orders_bench_http``,
dropped and made anew each run, and ``orders-bench-http``; ``/`` when
rabbitmqctl is missing).  A run places tens of thousands of orders; in the
service's own database, the first relay and payment step to start there
would publish their ``StartPayment`` events and charge every one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.harness import Proc  # noqa: E402
from worker.shim.models import PlaceOrderRequest  # noqa: E402

BODY = {
    "items": [{"product_id": "sku-bench", "quantity": 1}],
    "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
}


def baseline_app() -> Any:
    """The baseline: parse the same body, answer 202, nothing else."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/orders", status_code=202)
    def place(body: PlaceOrderRequest) -> dict[str, str]:
        order_id = str(uuid.uuid4())
        return {"order_id": order_id, "status": "pending", "status_url": f"/orders/{order_id}"}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


#: this benchmark's own database and vhost (see the module docstring)
HTTP_DB, HTTP_VHOST = "orders_bench_http", "orders-bench-http"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout: float = 90) -> None:  # imports take 10 s+ on a loaded machine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


class _Connections:
    """Keep-alive HTTP/1.1 connections speaking just enough to time a request.

    httpx costs ~3 ms of CPU per request: at 1,000 req/s the generator, not the
    server, would be measured.  This raw client costs a few tens of µs.
    """

    def __init__(self, host: str, port: int, most: int) -> None:
        self.host, self.port, self.most, self.made = host, port, most, 0
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def request(self, raw: bytes) -> int:
        """The status; ``SHED`` for a 503 the shim answered ``overloaded`` (shed, not failed).

        A request that fails or is cancelled (a caller's timeout) closes its connection and frees its
        place, so a later request opens a new one: else every connection lost so would be gone for good,
        and once all ``most`` were, every request would wait for an idle one that never comes (the
        generator, not the server, stopped: the soak through the shim saw its load fall to nothing)."""
        if self.idle.empty() and self.made < self.most:
            self.made += 1
            try:
                conn = await asyncio.open_connection(self.host, self.port)
            except BaseException:
                self.made -= 1
                raise
        else:
            conn = await self.idle.get()
        reader, writer = conn
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
        except BaseException:
            writer.close()
            self.made -= 1
            raise
        self.idle.put_nowait(conn)
        status = int(head[9:12])
        return SHED if status == 503 and _error_code(body) == "overloaded" else status


#: what :meth:`_Connections.request` reports for a request the shim shed (503 ``overloaded``)
SHED = -503


def _error_code(body: bytes) -> str | None:
    try:
        return json.loads(body).get("error")  # type: ignore[no-any-return]
    except (ValueError, AttributeError):
        return None


def _raw_post(url: str, headers: dict[str, str]) -> bytes:
    body = json.dumps(BODY).encode()
    lines = [
        "POST /orders HTTP/1.1",
        f"Host: {url.split('//')[1]}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _offer(url: str, headers: dict[str, str], rate: float, duration: float, out: Any) -> None:
    host, port = url.split("//")[1].split(":")
    pool, raw = _Connections(host, int(port), 500), _raw_post(url, headers)
    results: list[tuple[int, float]] = []

    async def one(scheduled: float) -> None:
        try:
            status = await asyncio.wait_for(pool.request(raw), 30)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            status = 0
        results.append((status, time.perf_counter() - scheduled))

    start, tasks = time.perf_counter() + 0.2, []
    for i in range(int(rate * duration)):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    out.put(results)


def _generator(url: str, headers: dict[str, str], rate: float, duration: float, out: Any) -> None:
    asyncio.run(_offer(url, headers, rate, duration, out))


def offer_load(url: str, headers: dict[str, str], rate: float, duration: float, procs: int) -> dict[str, float]:
    """Open-loop load from ``procs`` generator processes; accepted/s and latency percentiles (ms)."""
    out: Any = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_generator, args=(url, headers, rate / procs, duration, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    results = [r for _ in workers for r in out.get()]
    for w in workers:
        w.join()
    ok = sorted(lat for status, lat in results if status in (201, 202))
    shed = sum(status == SHED for status, _ in results)
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [0.0] * 99
    return {
        "offered": rate,
        "accepted_per_s": len(ok) / duration,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "shed": shed,
        "errors": len(results) - len(ok) - shed,
    }


def visible_latency(url: str, headers: dict[str, str], samples: int, rate: float) -> dict[str, float]:
    """POST, then GET every 2 ms until the order shows: ms from POST sent to first 200.

    A POST that is shed (503) or not answered in time is no sample: the
    load before may have left the shim busy.
    """
    found: list[float] = []
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for _ in range(samples):
            t0 = time.perf_counter()
            try:
                placed = client.post("/orders", json=BODY)
            except httpx.TimeoutException:
                continue
            if placed.status_code != 202:
                continue
            order_id = placed.json()["order_id"]
            while client.get(f"/orders/{order_id}").status_code != 200:
                if time.perf_counter() - t0 > 10:
                    break
                time.sleep(0.002)
            found.append((time.perf_counter() - t0) * 1000)
            time.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
    q = statistics.quantiles(found, n=100) if len(found) > 1 else [float("nan")] * 99
    return {"p50_ms": q[49], "p99_ms": q[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000, help="offered POST /orders per second")
    parser.add_argument("--duration", type=float, default=20, help="seconds of load per target")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (shim and baseline)")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--samples", type=int, default=200, help="orders timed from POST to visible")
    parser.add_argument(
        "--sweep",
        default="",
        help="also offer the shim these rates (comma separated, "
        "10 s each) and report the highest one with p99 under --p99-ms",
    )
    parser.add_argument("--p99-ms", type=float, default=25.0, help="the p99 the sweep looks for")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    from bench import isolated_env, prepare  # scripts/ is on sys.path

    from worker import catalogue, db
    from worker.settings import load_settings
    from worker.shim.auth import issue_token

    os.environ.update(isolated_env(HTTP_DB, HTTP_VHOST))
    settings = load_settings()
    db.drop_database(settings.database)  # each run starts empty
    prepare(dict(os.environ))  # migrate, topology, the demo catalogue

    engine = db.make_engine(settings.database, pool_size=1)
    catalogue.upsert(
        engine, [catalogue.ProductRow(product_id="sku-bench", name="Bench", price=100, currency="USD", active=True)]
    )
    headers = {"Authorization": "Bearer " + issue_token(settings.shim, "bench", "user", 3600)}
    big = "1000000000"
    env = {
        **os.environ,
        **{
            f"ORDERS_SHIM__{k}": big
            for k in (
                "PLACE_RATE_PER_MINUTE",
                "READ_RATE_PER_MINUTE",
                "PLACE_RATE_PER_MINUTE_PER_ADDRESS",
                "READ_RATE_PER_MINUTE_PER_ADDRESS",
            )
        },
        "ORDERS_LOGGING__LEVEL": "WARNING",
    }
    shim_port, base_port = free_port(), free_port()
    procs = [
        Proc.orders(
            [
                "worker",
                "--queue",
                "orders.place",
                "--queue",
                "orders.cancel",
                "--queue",
                "orders.payment-confirmed",
            ],
            env,
            subprocess.DEVNULL,
        ),
        Proc.orders(["shim", "--port", str(shim_port), "--workers", str(args.workers)], env, subprocess.DEVNULL),
        Proc(
            "baseline",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "bench_http:baseline_app",
                "--app-dir",
                str(Path(__file__).parent),
                "--port",
                str(base_port),
                "--workers",
                str(args.workers),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env,
            None,
        ),
    ]
    try:
        shim_url, base_url = f"http://127.0.0.1:{shim_port}", f"http://127.0.0.1:{base_port}"
        wait_healthy(shim_url)
        wait_healthy(base_url)
        offer_load(shim_url, headers, min(args.rate, 200), 3, 1)  # warm the connections
        # the sweep first, lowest rate first: a saturating run leaves work behind that would slow the next
        sweep = {
            rate: offer_load(shim_url, headers, rate, 10, args.generators)
            for rate in sorted(float(r) for r in args.sweep.split(",") if r.strip())
        }
        rows = {
            "baseline (FastAPI, 202 only)": offer_load(base_url, headers, args.rate, args.duration, args.generators),
            "shim POST /orders": offer_load(shim_url, headers, args.rate, args.duration, args.generators),
        }
        visible = visible_latency(shim_url, headers, args.samples, rate=50)
    finally:
        for p in procs:
            p.signal(signal.SIGTERM)
        for p in procs:
            p.stop(30)
    within = [
        r
        for r, v in sweep.items()
        if v["errors"] == 0 and v["shed"] == 0 and v["accepted_per_s"] >= 0.98 * r and v["p99_ms"] < args.p99_ms
    ]
    best = max(within, default=None)
    if args.json:
        print(
            json.dumps(
                {
                    "offered_per_s": args.rate,
                    "duration_s": args.duration,
                    "workers": args.workers,
                    "targets": rows,
                    "visible": visible,
                    "sweep": {str(k): v for k, v in sweep.items()},
                    "best_rate_within_p99": best,
                    "p99_ms_target": args.p99_ms,
                }
            )
        )
        return
    print(
        f"\noffered {args.rate:.0f} req/s for {args.duration:.0f} s; uvicorn workers={args.workers}, "
        f"{os.cpu_count()} CPUs, load generators on the same machine\n"
    )
    print(f"| {'target':<30} | accepted/s | p50 ms | p99 ms |   shed | errors |")
    print(f"|{'-' * 32}|-----------:|-------:|-------:|-------:|-------:|")
    for name, r in rows.items():
        print(
            f"| {name:<30} | {r['accepted_per_s']:10.0f} | {r['p50_ms']:6.1f} | {r['p99_ms']:6.1f} | "
            f"{r['shed']:6.0f} | {r['errors']:6.0f} |"
        )
    for rate, r in sweep.items():
        print(
            f"| {f'shim at {rate:.0f}/s (10 s)':<30} | {r['accepted_per_s']:10.0f} | {r['p50_ms']:6.1f} | "
            f"{r['p99_ms']:6.1f} | {r['shed']:6.0f} | {r['errors']:6.0f} |"
        )
    print(
        "\nshed: 503 `overloaded` with Retry-After (the shim's concurrency limit or Redis pool; "
        "see orders_shim_shed_total); errors: any other failure or no answer"
    )
    if sweep:
        print(f"\nhighest rate swept with p99 < {args.p99_ms:g} ms: " + (f"{best:.0f}/s" if best else "none"))
    print(
        f"\nPOST → visible through GET ({args.samples} orders at 50/s): "
        f"p50 {visible['p50_ms']:.1f} ms, p99 {visible['p99_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
