#!/usr/bin/env python3
"""POST /orders beside the peer: the shim against FastAPI + PyJWT + pydantic + Dramatiq's ``send``.

The measurement of ``../shared/bench/peers/http_side_by_side.py``, from this
repository, in rounds: the same open-loop generator (``scripts/bench_http.py``:
requests leave on a fixed schedule, latency from the scheduled time), the same
uvicorn worker count, no consumers (the commands pile up in their queue and are
purged after each step).  The shim's rate limits are raised out of the way as
there; every other edge check stays on.  For each rate of ``--rates``, each
round offers ours and the peer (``scripts/peers/http_peer.py``, a copy of the
shared one) ``--seconds`` of load, who goes first alternating (ours-peer,
peer-ours, ...); printed: accepted/s, p50 and p99 of each round and their
medians, and the CPU µs per accepted POST of the HTTP processes (the shim's or
the peer's uvicorn workers) and of RabbitMQ.

Usage (the one command of issue 25's POST sweep, with three rounds)::

    .venv/bin/python scripts/bench_http_peer.py --rates 400,600,800,1000 --seconds 10 --rounds 3

Database ``orders_bench_http_peer`` (dropped and made anew), vhosts
``orders-bench-http-ours`` and ``orders-bench-http-peer``.  Needs Dramatiq 2:
``.venv/bin/pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_http  # noqa: E402
from bench import isolated_env, prepare  # noqa: E402

from scripts import benchkit, harness  # noqa: E402
from scripts.bench_drain import PEERS_DIR, BenchError, component_meter, dramatiq_cli, say  # noqa: E402
from scripts.harness import Proc  # noqa: E402

DB, OURS_VHOST, PEER_VHOST = "orders_bench_http_peer", "orders-bench-http-ours", "orders-bench-http-peer"
PEER_SECRET = "peer-secret-peer-secret-peer-secret!"


def purge(url: str, queue: str) -> None:
    from worker.rabbit.connection import connection_parameters

    conn = pika.BlockingConnection(connection_parameters(url, 60))
    try:
        ch = conn.channel()
        ch.queue_declare(queue, passive=True)
        ch.queue_purge(queue)
    except pika.exceptions.ChannelClosedByBroker:
        pass  # not declared yet: nothing to purge
    finally:
        if conn.is_open:
            conn.close()


def offer(target: dict[str, Any], rate: float, seconds: float, generators: int) -> dict[str, Any]:
    """One step of load against one side, with the CPU of its processes per accepted POST."""
    meter = target["meter"]
    a = meter.snapshot()
    r = bench_http.offer_load(target["url"], target["headers"], rate, seconds, generators)
    b = meter.snapshot()
    accepted = int(r["accepted_per_s"] * seconds)
    cost = benchkit.cpu_cost(a, b, max(1, accepted), ("http", "rabbitmq"))
    purge(target["amqp"], target["queue"])
    return {**r, "cpu_us_per_post": {k: round(v, 1) for k, v in cost.us_per_order.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="400,600,800,1000", help="offered POST/s, comma separated")
    ap.add_argument("--seconds", type=float, default=10, help="seconds of load per step (default 10)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over all rates (default 1)")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn workers of each side (default 2)")
    ap.add_argument("--generators", type=int, default=2, help="load generator processes (default 2)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    try:
        dramatiq_cli()
    except BenchError as exc:
        ap.error(str(exc))

    from worker import catalogue, db
    from worker.settings import load_settings
    from worker.shim.auth import issue_token

    os.environ.update(isolated_env(DB, OURS_VHOST))
    settings = load_settings()
    db.drop_database(settings.database)
    prepare(dict(os.environ))
    engine = db.make_engine(settings.database, pool_size=1)
    catalogue.upsert(
        engine, [catalogue.ProductRow(product_id="sku-bench", name="Bench", price=100, currency="USD", active=True)]
    )
    engine.dispose()
    peer_vhost = harness.private_vhost_or_default(PEER_VHOST) or "/"
    peer_amqp = harness.vhost_url(settings.rabbitmq.url.get_secret_value(), peer_vhost)
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
        "PEER_AMQP": peer_amqp,
        "PEER_JWT_SECRET": PEER_SECRET,
    }
    import jwt

    ours_port, peer_port = bench_http.free_port(), bench_http.free_port()
    shim = Proc.orders(["shim", "--port", str(ours_port), "--workers", str(args.workers)], env, Path(os.devnull))
    peer = Proc(
        "http-peer",
        [sys.executable, "-m", "uvicorn", "http_peer:app", "--app-dir", str(PEERS_DIR), "--port", str(peer_port)]
        + ["--workers", str(args.workers), "--no-access-log", "--log-level", "warning"],
        env,
        Path(os.devnull),
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        sides = {
            "ours": {
                "url": f"http://127.0.0.1:{ours_port}",
                "headers": {"Authorization": "Bearer " + issue_token(settings.shim, "bench", "user", 3600 * 6)},
                "amqp": settings.rabbitmq.url.get_secret_value(),
                "queue": "orders.place",
                "proc": shim,
            },
            "peer": {
                "url": f"http://127.0.0.1:{peer_port}",
                "headers": {
                    "Authorization": "Bearer "
                    + jwt.encode({"sub": "bench", "exp": time.time() + 3600 * 6}, PEER_SECRET, "HS256")
                },
                "amqp": peer_amqp,
                "queue": "peer_place",
                "proc": peer,
            },
        }
        rabbit = [benchkit.Server(harness.amqp_port(settings.rabbitmq.url.get_secret_value()))]
        for side in sides.values():
            side["meter"] = component_meter({"http": benchkit.tree(side["proc"].pid), "rabbitmq": rabbit[0].whole()})
            bench_http.wait_healthy(side["url"])
        say(f"warming both sides up; {benchkit.machine_line()}")
        for side in sides.values():
            bench_http.offer_load(side["url"], side["headers"], 200, 3, 1)
            purge(side["amqp"], side["queue"])
        runs: dict[str, dict[float, list[dict[str, Any]]]] = {"ours": {}, "peer": {}}
        step = 0
        for rnd in range(args.rounds):
            for rate in rates:
                order = ["ours", "peer"] if step % 2 == 0 else ["peer", "ours"]
                step += 1
                for who in order:
                    r = offer(sides[who], rate, args.seconds, args.generators)
                    runs[who].setdefault(rate, []).append(r)
                    say(
                        f"round {rnd + 1} {who} at {rate:.0f}/s: accepted {r['accepted_per_s']:.0f}/s, "
                        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, http CPU "
                        f"{r['cpu_us_per_post'].get('http', 0):.0f} µs/POST"
                    )
    finally:
        for p in (shim, peer):
            p.stop(30)
        db.drop_database(settings.database)

    def med(who: str, rate: float, key: str) -> float | None:
        return benchkit.median(r[key] for r in runs[who][rate])

    def med_cpu(who: str, rate: float, key: str) -> float | None:
        return benchkit.median(r["cpu_us_per_post"].get(key) for r in runs[who][rate])

    table = []
    for rate in rates:
        table.append(
            {
                "rate": rate,
                **{
                    f"{who}_{k}": med(who, rate, k)
                    for who in ("ours", "peer")
                    for k in ("accepted_per_s", "p50_ms", "p99_ms", "shed", "errors")
                },
                **{f"{who}_http_us_per_post": med_cpu(who, rate, "http") for who in ("ours", "peer")},
            }
        )
    if args.json:
        print(json.dumps({"medians": table, "runs": runs, "machine": benchkit.machine_line()}, default=str))
        return 0
    print(
        f"POST /orders, {args.seconds:g} s per step, {args.rounds} round(s), who goes first alternating; "
        f"{args.workers} uvicorn workers each, no consumers; medians; {benchkit.machine_line()} (at the end)\n"
    )
    print(
        "| rate | ours acc/s | ours p50 ms | ours p99 ms | peer acc/s | peer p50 ms | peer p99 ms "
        "| ours µs/POST | peer µs/POST | ours shed/errors | peer errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    f = benchkit.fmt
    for t in table:
        print(
            f"| {t['rate']:.0f} | {f(t['ours_accepted_per_s'])} | {f(t['ours_p50_ms'], '.1f')} | "
            f"{f(t['ours_p99_ms'], '.1f')} | {f(t['peer_accepted_per_s'])} | {f(t['peer_p50_ms'], '.1f')} | "
            f"{f(t['peer_p99_ms'], '.1f')} | {f(t['ours_http_us_per_post'])} | {f(t['peer_http_us_per_post'])} | "
            f"{f(t['ours_shed'])}/{f(t['ours_errors'])} | {f(t['peer_errors'])} |"
        )
    print(
        "\nµs/POST: CPU of the HTTP processes (uvicorn workers and their parent) per accepted POST; shed: 503 "
        "overloaded (the shim's concurrency limit or Redis pool), errors: anything else or no answer in 30 s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
