"""Dramatiq peer of the paid path: per order one transaction (inbox, price, order, outbox), the Stripe
call through the SDK (create + confirm with an idempotency key), one transaction (payment row, order
completed, outbox).

``python peer_paid_dramatiq.py N`` preloads N orders (``--schema-only``: makes the
tables and sends nothing, for an open-loop run that sends as it goes);
``dramatiq peer_paid_dramatiq -p 2 -t 8`` consumes.  A copy of the shared peers'
``peer_paid_dramatiq.py``, the same per-order work; the broker comes from
``PEER_AMQP`` (default: the shared peers' URL), Stripe's base from
``PEER_STRIPE_BASE`` (a local fake), its key from ``PEER_STRIPE_KEY``.
"""

import json
import os
import sys

import common
import dramatiq
import stripe
from dramatiq.brokers.rabbitmq import RabbitmqBroker

broker = RabbitmqBroker(url=os.environ.get("PEER_AMQP", "amqp://guest:guest@127.0.0.1:5672/"))
dramatiq.set_broker(broker)
client = stripe.StripeClient(
    os.environ.get("PEER_STRIPE_KEY", "sk_test_local_fake"),
    base_addresses={"api": os.environ.get("PEER_STRIPE_BASE", "http://127.0.0.1:12111")},
)

DDL = """
CREATE TABLE IF NOT EXISTS peer_payments(order_id uuid primary key, intent text, status text, at timestamptz default now());
TRUNCATE peer_payments;
"""


@dramatiq.actor(queue_name="peer_paid", max_retries=3)
def place_and_pay(cmd):
    if common.place_order(cmd) is None:
        return
    total = (100 + cmd["product_id"]) * cmd["quantity"]
    intent = client.payment_intents.create(
        params={
            "amount": total,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "metadata": {"order_id": cmd["order_id"]},
        },
        options={"idempotency_key": "order-" + cmd["order_id"]},
    )
    c = common.conn()
    with c, c.cursor() as cur:
        cur.execute(
            "INSERT INTO peer_payments(order_id, intent, status) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (cmd["order_id"], intent.id, intent.status),
        )
        cur.execute("UPDATE peer_orders SET status='completed' WHERE id=%s AND status='pending'", (cmd["order_id"],))
        cur.execute(
            "INSERT INTO peer_outbox(routing_key,payload) VALUES ('order.completed', %s)",
            (json.dumps({"order_id": cmd["order_id"]}),),
        )


def prepare():
    broker.flush_all()
    common.reset()
    c = common.conn()
    with c, c.cursor() as cur:
        cur.execute(DDL)


if __name__ == "__main__":
    prepare()
    if sys.argv[1] != "--schema-only":
        for cmd in common.commands(int(sys.argv[1])):
            place_and_pay.send(cmd)
