#!/usr/bin/env python3
"""A churning outbox: the relay's poll, old and new, as dead rows pile up (a benchmark, not a test).

Issue 25 item 2: with autovacuum off (or held back by a long transaction) the
outbox's published rows stay behind as dead tuples, and the old poll
(``WHERE published_at IS NULL ORDER BY id``, :data:`worker.relay.FULL_POLL`)
walks all of their index entries before it finds a live row.  The keyset poll
(:data:`worker.relay.POLL`, ``id > :after``) starts at the relay's floor.

What it does, in its own database ``orders_bench_outbox`` (dropped and
re-created, migrated to head), with autovacuum disabled on ``outbox`` (as a
machine with ``autovacuum = off`` has it, or one that lags):

- writes the events of ``--orders`` orders (``--events-per-order``, 4: what
  90,000 orders left in the issue's outbox) in transactions of
  ``--batch`` rows, and after each one lets the real relay
  (:class:`worker.relay.Relay`: its keyset, its poll, its delete, in one
  transaction per round) take them, through a publisher that drops the
  messages (the broker's side is not what is measured);
- every ``--every`` orders, with one live row waiting (the steady state of a
  relay that keeps up), times both polls: ``EXPLAIN (ANALYZE, BUFFERS)`` of
  each (shared buffers hit and read, ms) and the median wall time of 5 runs
  (in a transaction rolled back, so nothing is locked or published);
  and the relay's own rounds since the last line (median ms per round).

Usage::

    nice -n 15 .venv/bin/python scripts/bench_outbox_poll.py                  # 500,000 orders, about 4 minutes
    nice -n 15 .venv/bin/python scripts/bench_outbox_poll.py --orders 50000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text  # noqa: E402

from scripts import harness  # noqa: E402
from worker import db  # noqa: E402
from worker.relay import FULL_POLL, POLL, Relay  # noqa: E402
from worker.settings import load_settings  # noqa: E402

DBNAME = "orders_bench_outbox"
_INSERT = text(
    "INSERT INTO outbox (event_id, exchange, routing_key, message_type, order_id, body)"
    " SELECT gen_random_uuid(), 'inventory', 'stock.reserve', 'stock.reserve', gen_random_uuid(),"
    ' \'{"items":[{"product_id":"sku-1","quantity": 1}]}\' FROM generate_series(1, :n)'
)


class DroppingPublisher:
    """The publisher's one method the relay calls; the broker's side is not measured."""

    def publish_batch(self, messages: list[Any], timeout: float = 30) -> None:
        pass


def measure(engine: Engine, statement: Any, params: dict[str, Any]) -> tuple[float, int, float]:
    """EXPLAIN (ANALYZE, BUFFERS) ms and shared buffers, and the median wall ms of 5 runs, rolled back."""
    sql = str(statement)
    with engine.connect() as conn:
        with conn.begin() as tx:
            plan = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"), params).scalar_one()
            tx.rollback()
        plan = json.loads(plan) if isinstance(plan, str) else plan
        top = plan[0]
        buffers = int(top["Plan"].get("Shared Hit Blocks", 0)) + int(top["Plan"].get("Shared Read Blocks", 0))
        walls = []
        for _ in range(5):
            with conn.begin() as tx:
                t0 = time.perf_counter()
                conn.execute(text(sql), params).all()
                walls.append((time.perf_counter() - t0) * 1000)
                tx.rollback()
    return float(top["Execution Time"]), buffers, statistics.median(walls)


def dead_rows(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
    with engine.connect() as conn:
        live, dead = conn.execute(
            text("SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relname = 'outbox'")
        ).one()
    return int(live), int(dead)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=500_000, help="orders' worth of events churned (default 500000)")
    ap.add_argument("--events-per-order", type=int, default=4)
    ap.add_argument("--every", type=int, default=50_000, help="orders between two measurements")
    ap.add_argument("--batch", type=int, default=1000, help="rows per inserting transaction and per relay round")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()

    env = {**os.environ, "ORDERS_ENVIRONMENT": "development", "ORDERS_DATABASE__DBNAME": DBNAME}
    settings = load_settings(environ=env)
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"outbox_retention_hours": 0})}  # delete, as shipped
    )
    harness.fresh_database(settings.database)
    engine = db.make_engine(settings.database, pool_size=2)
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE outbox SET (autovacuum_enabled = off)"))
            server_av = conn.execute(text("SHOW autovacuum")).scalar_one()
        relay = Relay(settings, engine)
        publisher: Any = DroppingPublisher()
        print(
            f"database {DBNAME}; autovacuum {server_av} on the server, off on outbox; "
            f"{args.orders:,} orders x {args.events_per_order} events, {args.batch} rows per transaction and round"
        )
        header = (
            f"{'orders':>9} {'rows churned':>12} {'dead rows':>10} | {'old ms':>7} {'old buf':>8} {'old wall':>8}"
            f" | {'new ms':>7} {'new buf':>8} {'new wall':>8} | {'round ms':>8}"
        )
        print(header)
        print("-" * len(header))
        results: list[dict[str, Any]] = []
        rows_total = args.orders * args.events_per_order
        per_mark = args.every * args.events_per_order
        churned, rounds = 0, []
        started = time.monotonic()

        def mark() -> None:
            with engine.begin() as conn:
                conn.execute(_INSERT, {"n": 1})  # one live row waits: the poll's steady state
            live, dead = dead_rows(engine)
            old = measure(engine, FULL_POLL, {"limit": args.batch})
            new = measure(engine, POLL, {"after": relay.keyset.after, "limit": args.batch})
            round_ms = statistics.median(rounds) if rounds else 0.0
            rounds.clear()
            relay.publish_pending(publisher, args.batch)  # and it is taken
            row = {
                "orders": churned // args.events_per_order,
                "rows_churned": churned,
                "dead_rows": dead,
                "old_ms": old[0],
                "old_buffers": old[1],
                "old_wall_ms": old[2],
                "new_ms": new[0],
                "new_buffers": new[1],
                "new_wall_ms": new[2],
                "relay_round_ms": round_ms,
            }
            results.append(row)
            print(
                f"{row['orders']:>9,} {churned:>12,} {dead:>10,} | {old[0]:>7.2f} {old[1]:>8,} {old[2]:>8.2f}"
                f" | {new[0]:>7.3f} {new[1]:>8,} {new[2]:>8.3f} | {round_ms:>8.2f}",
                flush=True,
            )

        mark()
        while churned < rows_total:
            n = min(args.batch, rows_total - churned)
            with engine.begin() as conn:
                conn.execute(_INSERT, {"n": n})
            t0 = time.perf_counter()
            taken = relay.publish_pending(publisher, args.batch)
            rounds.append((time.perf_counter() - t0) * 1000)
            assert taken == n, f"the relay took {taken} of {n} rows"
            churned += n
            if churned % per_mark == 0 or churned == rows_total:
                mark()
        print(f"{time.monotonic() - started:.0f} s")
        if args.json:
            print(json.dumps(results))
    finally:
        engine.dispose()
        harness.drop_database(settings.database)
    return 0


if __name__ == "__main__":
    sys.exit(main())
