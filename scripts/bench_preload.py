#!/usr/bin/env python3
"""Loading a batch's orders in the unit of work: CPU per order, rows read by name or unpacked (a benchmark).

Every transaction that changes orders starts with
:meth:`worker.unit_of_work.PostgresUnitOfWork.preload`: the orders locked and
loaded (``FOR UPDATE``), then their lines and payments, each row turned into
an ``Order``, a ``Line``, a ``PaymentRecord``.  A paid order is loaded twice
(the payment step's two transactions).  This times, in this thread
(``time.thread_time``: PostgreSQL's CPU is not counted), ``--batches``
transactions of ``--size`` random orders each, rolled back, with:

- ``by name``: the rows read as ``row.column`` and ``row._asdict()``, as
  ``_load_orders`` did until 2026-12-07 (kept here as the baseline);
- ``unpacked``: the service's ``_load_orders`` now (rows unpacked as tuples in
  the statements' column order);

in ``--rounds`` alternating rounds (who goes first alternates), after checking
that both load the same orders, lines and payments, and prints the medians of
µs per order and load.

Its database ``orders_bench_preload`` is made afresh (migrated to head) and
filled with ``--orders`` card orders placed through the service's own
PlaceOrder handler, a payment recorded for each; it is dropped at the end.

Usage::

    .venv/bin/python scripts/bench_preload.py                  # 2,000 orders, 300 batches of 20, 6 rounds
    .venv/bin/python scripts/bench_preload.py --rounds 3 --size 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text  # noqa: E402

from handlers.orders import Line, Order, Status  # noqa: E402
from handlers.unit_of_work import PaymentRecord, PaymentStatus  # noqa: E402
from scripts import harness  # noqa: E402
from scripts.bench_drain import CATALOGUE, products_for_bench  # noqa: E402
from scripts.benchkit import machine_line  # noqa: E402
from worker import catalogue, db  # noqa: E402
from worker import unit_of_work as uow_module  # noqa: E402
from worker.commands import Applier, decode  # noqa: E402
from worker.rabbit.connection import Delivery  # noqa: E402
from worker.settings import load_settings  # noqa: E402

DBNAME = "orders_bench_preload"
Loader = Callable[[uow_module.PostgresUnitOfWork, list[str]], None]


def by_name(self: uow_module.PostgresUnitOfWork, ids: list[str]) -> None:
    """``_load_orders`` as it was until 2026-12-07: columns read by name."""
    if not ids:
        return
    rows = self.conn.execute(uow_module._LOCK_ORDERS, {"ids": ids}).all()
    for pid in ids:
        self._orders[pid] = None
        self._payments.setdefault(pid, None)
    if not rows:
        return
    found = [r.order_id for r in rows]
    for r in rows:
        status = Status(r.status)
        self._orders[r.order_id] = Order(
            order_id=r.order_id,
            user_id=r.user_id,
            status=status,
            currency=r.currency,
            total=r.total,
            payment_provider=r.payment_provider,
            payment_request=r.payment_request,
            place_message_id=r.place_message_id,
            next_action=r.next_action,
            shipment=r.shipment,
            reason=r.reason,
            correlation_id=r.correlation_id,
            loaded_status=status,
            paid_seconds_ago=r.paid_seconds_ago,
        )
    for r in self.conn.execute(uow_module._LINES, {"ids": found}):
        self._orders[r.order_id].lines.append(Line(r.product_id, r.quantity, r.unit_price))  # type: ignore[union-attr]
    for r in self.conn.execute(uow_module._PAYMENTS, {"ids": found}):
        fields = r._asdict()
        self._payments[r.order_id] = PaymentRecord(**{**fields, "status": PaymentStatus(fields["status"])})


def place(engine: Engine, n: int) -> list[str]:
    """``n`` card orders of the demo catalogue placed through the PlaceOrder handler (1-3 lines each), each
    with a payment recorded."""
    catalogue.upsert(engine, catalogue.read(CATALOGUE))
    products = [p["product_id"] for p in products_for_bench()]
    ids = [str(uuid.uuid4()) for _ in range(n)]
    applier = Applier(engine)
    for start in range(0, n, 250):
        batch = []
        for order_id in ids[start : start + 250]:
            body = {
                "order_id": order_id,
                "user_id": f"user-{random.randrange(100)}",
                "items": [
                    {"product_id": p, "quantity": random.randint(1, 3)}
                    for p in random.sample(products, random.randint(1, min(3, len(products))))
                ],
                "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
            }
            d = Delivery(0, "", "", "orders.place", json.dumps(body).encode(), str(uuid.uuid4()), "PlaceOrder",
                         None, None, "application/json", {}, False)  # fmt: skip
            batch.append((d, decode(d)))
        applier.apply_batch(batch)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO payments (order_id, provider, status, amount, currency, idempotency_key, attempts)"
                " SELECT order_id, 'stripe', 'started', total, currency, 'order-' || order_id || '-start', 1"
                " FROM orders WHERE currency IS NOT NULL"
            )
        )
    return ids


def _timeless(fields: dict[str, Any]) -> dict[str, Any]:
    """A loaded object's fields but those read from the clock (``paid_seconds_ago``, ``unchanged_seconds``)."""
    return {k: v for k, v in fields.items() if not k.endswith("_seconds_ago") and k != "unchanged_seconds"}


def load(engine: Engine, loader: Loader, batch: list[str]) -> Any:
    """One transaction preloading ``batch`` with ``loader``, rolled back; what it loaded."""
    original = uow_module.PostgresUnitOfWork._load_orders
    uow_module.PostgresUnitOfWork._load_orders = loader  # type: ignore[method-assign]
    try:
        with engine.begin() as conn:
            uow = uow_module.PostgresUnitOfWork(conn, "bench")
            uow.preload(batch, ())
            loaded = (
                {k: _timeless(vars(o)) for k, o in uow._orders.items() if o},
                {k: _timeless(vars(p)) for k, p in uow._payments.items() if p},
            )
            conn.rollback()
            return loaded
    finally:
        uow_module.PostgresUnitOfWork._load_orders = original  # type: ignore[method-assign]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=300, help="transactions per round (300)")
    ap.add_argument("--size", type=int, default=20, help="orders per transaction (20: a payment wave at saturation)")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    env = {**os.environ, "ORDERS_ENVIRONMENT": "development", "ORDERS_DATABASE__DBNAME": DBNAME}
    settings = load_settings(environ=env)
    harness.fresh_database(settings.database)
    engine = db.make_engine(settings.database, pool_size=2, pre_ping=False)
    try:
        ids = place(engine, args.orders)
        with engine.connect() as conn:
            paid = conn.execute(text("SELECT count(*) FROM payments")).scalar_one()
        if paid != args.orders:
            raise SystemExit(f"{paid} of {args.orders} orders were placed with a payment")
        batches = [random.sample(ids, args.size) for _ in range(args.batches)]
        loaders: dict[str, Loader] = {"by name": by_name, "unpacked": uow_module.PostgresUnitOfWork._load_orders}
        first = [load(engine, loader, batches[0]) for loader in loaders.values()]
        if any(f != first[0] for f in first):
            raise SystemExit("the loaders disagree on what they loaded")
        rounds: dict[str, list[float]] = {name: [] for name in loaders}
        for r in range(args.rounds):
            for name in list(loaders) if r % 2 == 0 else list(reversed(loaders)):
                for batch in batches[:20]:  # warm
                    load(engine, loaders[name], batch)
                started = time.thread_time()
                for batch in batches:
                    load(engine, loaders[name], batch)
                rounds[name].append((time.thread_time() - started) / (args.batches * args.size) * 1e6)
    finally:
        engine.dispose()
        harness.drop_database(settings.database)
    print(machine_line())
    print(f"CPU µs per order and load, this thread, {args.batches} transactions of {args.size} orders a round")
    print("| rows | median | rounds |")
    print("|---|---:|---|")
    for name, values in rounds.items():
        print(f"| {name} | **{statistics.median(values):.0f}** | {', '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
