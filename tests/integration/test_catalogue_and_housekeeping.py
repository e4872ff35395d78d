"""The catalogue import, the migration drift check and the retention housekeeping."""

from __future__ import annotations

import subprocess
import sys
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
