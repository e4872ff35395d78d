"""The catalogue import, the migration drift check and the retention housekeeping."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text

from worker.relay import Relay

ORDERS = str(Path(sys.executable).parent / "orders")


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ORDERS, *args], env=env, capture_output=True, text=True, timeout=120)


def test_products_import_is_idempotent_and_validates_first(test_env, clean_db, tmp_path):
    csv_file = tmp_path / "cat.csv"
    csv_file.write_text("product_id,name,price,currency,active\nsku-x,Thing,1234,USD,true\nsku-y,Other,5,EUR,false\n")
    for _ in range(2):
        done = run(["products", "import", str(csv_file)], test_env)
        assert done.returncode == 0, done.stderr
    csv_file.write_text("product_id,name,price,currency,active\nsku-x,Thing,1500,USD,true\n")
    assert run(["products", "import", str(csv_file)], test_env).returncode == 0
    with clean_db.connect() as conn:
        rows = dict(conn.execute(text("SELECT product_id, price FROM products WHERE product_id LIKE 'sku-_'")).all())
    assert rows == {"sku-x": 1500, "sku-y": 5}

    bad = tmp_path / "bad.json"
    bad.write_text('[{"product_id": "sku-z", "name": "Z", "price": -1, "currency": "USD"}]')
    done = run(["products", "import", str(bad)], test_env)
    assert done.returncode == 1 and "product 1: price" in done.stderr
    with clean_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM products WHERE product_id = 'sku-z'")).scalar_one() == 0


def test_models_match_the_migrations(test_env, settings):
    done = run(["migrate", "--check"], test_env)
    assert done.returncode == 0, done.stderr


def test_the_migrated_database_takes_every_order_status_and_no_currency(settings, clean_db):
    """alembic's check compares columns, not CHECK constraints: the status list is checked here."""
    from schema.tables import ORDER_STATUSES

    with clean_db.connect() as conn:
        check = conn.execute(
            text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'ck_orders_status_known'")
        ).scalar_one()
        nullable = conn.execute(
            text(
                "SELECT is_nullable FROM information_schema.columns"
                " WHERE table_name = 'orders' AND column_name = 'currency'"
            )
        ).scalar_one()
    assert {s for s in ORDER_STATUSES if f"'{s}'" in check} == set(ORDER_STATUSES)
    assert "refunded" in ORDER_STATUSES and nullable == "YES"


def test_housekeeping_deletes_only_rows_past_their_retention(settings, clean_db):
    with clean_db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO inbox (consumer, message_id, processed_at) VALUES"
                " ('orders', 'old', now() - interval '8 days'), ('orders', 'new', now())"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outbox (event_id, exchange, routing_key, message_type, body, published_at) VALUES"
                " (gen_random_uuid(), 'inventory', 'stock.reserve', 'stock.reserve', '{}', now() - interval '2 days'),"
                " (gen_random_uuid(), 'inventory', 'stock.reserve', 'stock.reserve', '{}', now()),"
                " (gen_random_uuid(), 'inventory', 'stock.reserve', 'stock.reserve', '{}', NULL)"
            )
        )
    kept = settings.model_copy(update={"worker": settings.worker.model_copy(update={"outbox_retention_hours": 24})})
    deleted = Relay(kept, clean_db).housekeeping()
    assert deleted == {"outbox": 1, "inbox": 1, "order_history": 0}
    with clean_db.connect() as conn:
        assert conn.execute(text("SELECT message_id FROM inbox")).scalars().all() == ["new"]
        assert conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one() == 1


def _lines_plan(conn, ids: list[str]) -> str:
    return "\n".join(
        conn.execute(
            text("EXPLAIN SELECT product_id FROM order_items WHERE order_id = ANY(CAST(:ids AS uuid[]))"), {"ids": ids}
        ).scalars()
    )


def test_housekeeping_analyzes_a_hot_table_whose_statistics_fell_behind(settings, clean_db):
    # with autovacuum off (as on this machine) or lagging, order_items is never analyzed: the planner takes
    # a batch's "order_id = ANY(...)" for a quarter of the table and reads all of it (280 ms a batch at
    # 466,000 rows, in bench_soak.py); the active relay's housekeeping analyzes it
    with clean_db.begin() as conn:
        for table in ("orders", "order_items"):
            conn.execute(text("SELECT pg_stat_reset_single_table_counters(CAST(:t AS regclass))"), {"t": table})
        conn.execute(
            text(
                "INSERT INTO orders (order_id, user_id, status, total, payment_provider, payment_request,"
                " place_message_id) SELECT gen_random_uuid(), 'u', 'pending', 100, 'stripe', '{}', 'm' || n"
                " FROM generate_series(1, 30000) AS n"
            )
        )
        conn.execute(
            text(
                "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price)"
                " SELECT order_id, 1, 'SKU-1', 1, 100 FROM orders"
            )
        )
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
    with clean_db.connect() as conn:
        ids = list(conn.execute(text("SELECT order_id::text FROM orders LIMIT 50")).scalars())
        assert "Seq Scan on order_items" in _lines_plan(conn, ids)  # what the hot path met
    relay = Relay(settings, clean_db)
    deadline = time.monotonic() + 10
    while True:  # the counters reach pg_stat_user_tables within a second or so
        relay.housekeeping()
        with clean_db.connect() as conn:
            plan = _lines_plan(conn, ids)
        if "Seq Scan" not in plan or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "Seq Scan" not in plan and "pk_order_items" in plan
    assert relay.analyze() == []  # analyzed a moment ago: not again


def test_with_no_outbox_retention_housekeeping_never_reads_the_outbox(settings, clean_db):
    # the relay deletes what it publishes; looking for published rows anyway read the whole outbox heap,
    # dead rows and all, every minute, and held the relay for over 26 s after 25 minutes at 221 orders/s
    # with autovacuum off (bench_soak.py)
    from sqlalchemy import event

    assert settings.worker.outbox_retention_hours == 0
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    event.listen(clean_db, "before_cursor_execute", seen)
    try:
        deleted = Relay(settings, clean_db).housekeeping()
    finally:
        event.remove(clean_db, "before_cursor_execute", seen)
    assert deleted["outbox"] == 0
    assert any("FROM inbox" in s for s in statements)  # housekeeping ran
    assert not [s for s in statements if "FROM outbox" in s]
