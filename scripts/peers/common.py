"""The unit of work every peer runs per PlaceOrder: dedup, price lookup, order insert, inventory event.

A copy of the shared peers' ``common.py`` (``../shared/bench/peers/``), the same
transaction statement for statement; only the database comes from ``PEER_DSN``
as there (the benchmarks point it at a database of their own).  Used only to
measure peers side by side with the service.
"""

import json
import os
import threading
import uuid

import psycopg2

DSN = os.environ.get("PEER_DSN", "dbname=peerbench host=127.0.0.1 user=root")

DDL = """
DROP TABLE IF EXISTS peer_inbox, peer_orders, peer_products, peer_outbox;
CREATE TABLE peer_products(id int primary key, price_cents int not null);
INSERT INTO peer_products SELECT g, 100 + g FROM generate_series(1, 1000) g;
CREATE TABLE peer_inbox(message_id text primary key, at timestamptz default now());
CREATE TABLE peer_orders(id uuid primary key, user_id text, product_id int, quantity int,
  total_cents int, status text, created timestamptz default now());
CREATE TABLE peer_outbox(id bigserial primary key, routing_key text, payload jsonb);
"""

_local = threading.local()


def conn():
    c = getattr(_local, "conn", None)
    if c is None or c.closed:
        c = _local.conn = psycopg2.connect(DSN)
    return c


def reset():
    c = psycopg2.connect(DSN)
    with c, c.cursor() as cur:
        cur.execute(DDL)
    c.close()


def count():
    c = psycopg2.connect(DSN)
    with c.cursor() as cur:
        cur.execute("select count(*) from peer_orders")
        n = cur.fetchone()[0]
    c.close()
    return n


def place_order(cmd):
    """One transaction per command; returns the inventory event to publish or None on duplicate."""
    c = conn()
    with c, c.cursor() as cur:
        cur.execute("INSERT INTO peer_inbox(message_id) VALUES (%s) ON CONFLICT DO NOTHING", (cmd["message_id"],))
        if cur.rowcount == 0:
            return None
        cur.execute("SELECT price_cents FROM peer_products WHERE id=%s", (cmd["product_id"],))
        price = cur.fetchone()[0]
        oid = cmd["order_id"]
        cur.execute(
            "INSERT INTO peer_orders(id,user_id,product_id,quantity,total_cents,status)"
            " VALUES (%s,%s,%s,%s,%s,'pending')",
            (oid, cmd["user_id"], cmd["product_id"], cmd["quantity"], price * cmd["quantity"]),
        )
        event = {"order_id": oid, "product_id": cmd["product_id"], "quantity": cmd["quantity"]}
        cur.execute("INSERT INTO peer_outbox(routing_key,payload) VALUES ('stock.reserve', %s)", (json.dumps(event),))
        return event


def command(i):
    """The i-th PlaceOrder of a run (fresh ids each call)."""
    return {
        "message_id": str(uuid.uuid4()),
        "order_id": str(uuid.uuid4()),
        "user_id": f"u{i % 997}",
        "product_id": 1 + i % 1000,
        "quantity": 1 + i % 3,
    }


def commands(n):
    for i in range(n):
        yield command(i)
