#!/usr/bin/env python3
"""The benchmark report: drain, HTTP and a memory soak, in one go, one table.

Runs, one after another (never together, so they do not share the cores):

1. ``scripts/bench_drain.py``: N preloaded PlaceOrders drained by the pool
   with the relay publishing every event under confirms, against the
   one-transaction-per-order psycopg2 baseline of the same run;
2. ``scripts/bench_http.py``: open-loop POST /orders at a fixed rate against
   the shim and a minimal FastAPI baseline, and POST→visible through GET;
3. a soak: the pool and relay under a steady offered load for
   ``--soak-minutes``, sampling each worker process's RSS; flat means the
   samples after the first minute stay within ±10 % of their first value.

Each part uses its own database and vhost.  Usage::

    .venv/bin/python scripts/bench.py                      # full report (about 15 min)
    .venv/bin/python scripts/bench.py --soak-minutes 1 --orders 10000 --rate 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_drain  # noqa: E402

from scripts import harness  # noqa: E402
from scripts.harness import Proc  # noqa: E402
from worker.rabbit.connection import connection_parameters  # noqa: E402

PY = sys.executable
ORDERS = str(Path(PY).parent / "orders")
SOAK_DB, SOAK_VHOST = "orders_soak", "orders-soak"
#: RSS samples taken during the soak's first minute are warm-up, not judged
WARMUP_SECONDS = 60.0


def run_json(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    done = subprocess.run([PY, *args, "--json"], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return json.loads(out[out.index("{") :])


def isolated_env(dbname: str, vhost: str) -> dict[str, str]:
    from worker.settings import load_settings

    made = harness.private_vhost_or_default(vhost)
    url = harness.vhost_url(load_settings().rabbitmq.url.get_secret_value(), made)
    return {
        "ORDERS_ENVIRONMENT": "development",
        **os.environ,
        "ORDERS_DATABASE__DBNAME": dbname,
        "ORDERS_RABBITMQ__URL": url,
        "ORDERS_LOGGING__LEVEL": "WARNING",
        "ORDERS_METRICS__PORT": "0",
    }


def prepare(env: dict[str, str]) -> None:
    for verb in (["migrate"], ["topology"], ["products", "import", str(ROOT / "config" / "products.demo.json")]):
        subprocess.run([ORDERS, *verb], env=env, check=True, capture_output=True, timeout=120)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def soak(minutes: float, rate: float) -> dict[str, Any]:
    """Steady load on the pool; RSS of each worker process over time."""
    import pika

    env = isolated_env(SOAK_DB, SOAK_VHOST)
    prepare(env)
    logs = Path(tempfile.mkdtemp(prefix="orders-soak-"))
    pool = Proc.orders(
        [
            "worker",
            "--processes",
            "2",
            "--queue",
            "orders.place",
            "--queue",
            "orders.cancel",
            "--queue",
            "orders.payment-confirmed",
        ],
        env,
        logs / "worker.log",
    )
    relay = Proc.orders(["relay"], env, logs / "relay.log")
    stop = threading.Event()
    sent = [0]

    def publish() -> None:
        conn = pika.BlockingConnection(connection_parameters(env["ORDERS_RABBITMQ__URL"], 60))
        ch = conn.channel()
        body = {
            "user_id": "soak",
            "items": [{"product_id": "sku-apple", "quantity": 1}],
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
        }
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate)
            while sent[0] < due:
                ch.basic_publish(
                    "orders.commands",
                    "order.place",
                    json.dumps(body).encode(),
                    pika.BasicProperties(
                        message_id=str(uuid.uuid4()),
                        type="PlaceOrder",
                        content_type="application/json",
                        delivery_mode=2,
                    ),
                )
                sent[0] += 1
            conn.sleep(0.01)
        conn.close()

    feeder = threading.Thread(target=publish, daemon=True)
    samples: dict[int, list[tuple[float, int]]] = {}
    try:
        time.sleep(3)
        feeder.start()
        began = time.monotonic()
        while time.monotonic() - began < minutes * 60:
            time.sleep(10)
            for pid in pool.children():
                samples.setdefault(pid, []).append((time.monotonic() - began, rss_kib(pid)))
    finally:
        stop.set()
        feeder.join(10)
        for p in (pool, relay):
            p.signal(signal.SIGTERM)
        for p in (pool, relay):
            p.stop(60)
    judged = {}
    for pid, points in samples.items():
        after = [kib for t, kib in points if t >= min(WARMUP_SECONDS, minutes * 30)]
        if after:
            first = after[0]
            judged[pid] = {
                "first_mib": first / 1024,
                "min_mib": min(after) / 1024,
                "max_mib": max(after) / 1024,
                "drift_pct": 100 * (max(abs(max(after) - first), abs(first - min(after)))) / first,
            }
    return {
        "minutes": minutes,
        "offered_per_s": rate,
        "published": sent[0],
        "workers": judged,
        "flat": bool(judged) and all(w["drift_pct"] <= 10 for w in judged.values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=20000, help="drain benchmark size")
    ap.add_argument("--rate", type=float, default=1000, help="offered POST /orders per second")
    ap.add_argument("--http-seconds", type=float, default=20, help="seconds of HTTP load per target")
    ap.add_argument(
        "--sweep",
        default="300,400,500,600,800",
        help="rates also offered to the shim, 10 s each, for the highest with p99 < 25 ms",
    )
    ap.add_argument("--soak-minutes", type=float, default=10, help="memory soak length")
    ap.add_argument("--soak-rate", type=float, default=500, help="commands per second during the soak")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    drain = run_json([str(ROOT / "scripts" / "bench_drain.py"), "--orders", str(args.orders)], dict(os.environ), 1200)
    http = run_json(
        [
            str(ROOT / "scripts" / "bench_http.py"),
            "--rate",
            str(args.rate),
            "--duration",
            str(args.http_seconds),
            "--sweep",
            args.sweep,
        ],
        dict(os.environ),
        900,
    )
    memory = soak(args.soak_minutes, args.soak_rate)
    result = {"drain": drain, "http": http, "soak": memory, "machine": bench_drain.machine()}
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    shim = http["targets"]["shim POST /orders"]
    base = http["targets"]["baseline (FastAPI, 202 only)"]
    rows = [
        ("drained orders/s (10-90 %)", f"{drain['drain']['drain_rate']:.0f}", "≥ 4000"),
        ("ratio to one tx per order (psycopg2 ×4)", f"{drain['ratio']:.2f}" if drain.get("ratio") else "n/a", "≥ 1.0"),
        (f"POST /orders accepted/s at {args.rate:.0f}/s offered", f"{shim['accepted_per_s']:.0f}", f"{args.rate:.0f}"),
        ("POST p50 / p99 ms", f"{shim['p50_ms']:.1f} / {shim['p99_ms']:.1f}", "p99 < 25"),
        ("baseline FastAPI p50 / p99 ms", f"{base['p50_ms']:.1f} / {base['p99_ms']:.1f}", ""),
        (
            "highest offered POST/s with p99 < 25 ms",
            f"{http['best_rate_within_p99'] or 0:.0f} (of {args.sweep})" if args.sweep else "not swept",
            "1000",
        ),
        ("order visible p99 ms", f"{http['visible']['p99_ms']:.1f}", "< 100"),
        (
            "peak RSS per worker (drain) MiB",
            ", ".join(f"{v}" for v in drain["drain"]["worker_peak_rss_mib"].values()),
            "",
        ),
        (f"worker RSS over {args.soak_minutes:g} min soak", "flat" if memory["flat"] else "NOT flat", "± 10 %"),
    ]
    for pid, w in memory["workers"].items():
        rows.append(
            (
                f"  worker {pid} RSS MiB first/min/max",
                f"{w['first_mib']:.1f}/{w['min_mib']:.1f}/{w['max_mib']:.1f}",
                f"drift {w['drift_pct']:.1f} %",
            )
        )
    m = result["machine"]
    print(f"\nmachine: {m}\n")
    print(f"| {'measure':<44} | {'value':>24} | {'target':>8} |")
    print(f"|{'-' * 46}|{'-' * 26}|{'-' * 10}|")
    for name, value, target in rows:
        print(f"| {name:<44} | {value:>24} | {target:>8} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
