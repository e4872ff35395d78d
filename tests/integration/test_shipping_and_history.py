"""ShipOrder (completed → shipped, then no cancel) and an order's story (``orders show``, the admin history)."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

from sqlalchemy import text

from schema.messages import ShipOrder
from worker.commands import Applier, decode
from worker.handled import Result
from worker.history import order_story
from worker.rabbit.connection import Delivery

SHIPMENT = {"carrier": "DHL", "tracking_number": "JD0146000000123"}


def _delivery(message_type: str, body: dict[str, Any], queue: str, message_id: str | None = None) -> Delivery:
    return Delivery(
        delivery_tag=1,
        body=json.dumps(body).encode(),
        message_id=message_id or str(uuid.uuid4()),
        message_type=message_type,
        correlation_id="corr-" + message_type,
        reply_to=None,
        content_type="application/json",
        headers={},
        exchange="orders.commands",
        routing_key="",
        queue=queue,
        redelivered=False,
    )


def _apply(engine: Any, message_type: str, body: dict[str, Any], queue: str) -> Any:
    d = _delivery(message_type, body, queue)
    return Applier(engine).apply_batch([(d, decode(d))])[0]


def _complete(engine: Any, order_id: str) -> None:
    """An order paid at once, as the payment step records it (no provider needed here)."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET status = 'completed' WHERE order_id = CAST(:o AS uuid)"), {"o": order_id})


def _status(engine: Any, order_id: str) -> tuple[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, shipment FROM orders WHERE order_id = CAST(:o AS uuid)"), {"o": order_id}
        ).one()
    return row.status, row.shipment


def _events(engine: Any, order_id: str) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        return [
            (r.routing_key, json.loads(r.body))
            for r in conn.execute(
                text("SELECT routing_key, body FROM outbox WHERE order_id = CAST(:o AS uuid) ORDER BY id"),
                {"o": order_id},
            )
        ]


def test_a_completed_order_ships_once_and_can_no_longer_be_cancelled(clean_db, make_place):
    order_id = str(uuid.uuid4())
    assert _apply(clean_db, "PlaceOrder", make_place(order_id=order_id), "orders.place").result is Result.APPLIED
    _complete(clean_db, order_id)
    ship = {"order_id": order_id, "shipment": SHIPMENT}
    assert _apply(clean_db, "ShipOrder", ship, "orders.ship").result is Result.APPLIED
    assert _status(clean_db, order_id) == ("shipped", SHIPMENT)
    shipped = [body for key, body in _events(clean_db, order_id) if key == "order.shipped"]
    assert len(shipped) == 1 and shipped[0]["shipment"] == SHIPMENT and shipped[0]["status"] == "shipped"
    # the same shipment again changes nothing; another one is refused and announced
    again = _apply(clean_db, "ShipOrder", ship, "orders.ship")
    assert again.result is Result.APPLIED and again.outcome.result == "unchanged"
    other = _apply(clean_db, "ShipOrder", {**ship, "shipment": {**SHIPMENT, "carrier": "UPS"}}, "orders.ship")
    assert other.result is Result.REFUSED
    cancel = {"order_id": order_id, "requested_by": {"user_id": "admin-1", "roles": ["admin"]}}
    refused = _apply(clean_db, "CancelOrder", cancel, "orders.cancel")
    assert refused.result is Result.REFUSED and refused.outcome.error == "not_cancellable"  # docs/contract.md
    announced = [b for k, b in _events(clean_db, order_id) if k == "command.refused"]
    assert [(b["command"], b["reason"]) for b in announced] == [
        ("ShipOrder", "illegal_transition"),
        ("CancelOrder", "not_cancellable"),
    ]
    assert _status(clean_db, order_id) == ("shipped", SHIPMENT)


def test_an_order_that_is_not_completed_is_not_shipped(clean_db, make_place):
    order_id = str(uuid.uuid4())
    _apply(clean_db, "PlaceOrder", make_place(order_id=order_id), "orders.place")
    h = _apply(clean_db, "ShipOrder", {"order_id": order_id, "shipment": SHIPMENT}, "orders.ship")
    assert h.result is Result.REFUSED and "pending" in h.reason
    assert _status(clean_db, order_id) == ("pending", None)
    # a ShipOrder is taken only from its own queue
    ship = _delivery("ShipOrder", {"order_id": order_id, "shipment": SHIPMENT}, "orders.cancel")
    from schema.messages import InvalidMessage

    try:
        decode(ship)
    except InvalidMessage as exc:
        assert "does not belong on queue 'orders.cancel'" in str(exc)
    else:
        raise AssertionError("a ShipOrder on orders.cancel was accepted")
    assert isinstance(
        decode(_delivery("ShipOrder", {"order_id": order_id, "shipment": SHIPMENT}, "orders.ship")), ShipOrder
    )


def test_the_story_names_the_command_behind_each_transition_event_and_refusal(clean_db, make_place):
    order_id = str(uuid.uuid4())
    _apply(clean_db, "PlaceOrder", make_place(order_id=order_id), "orders.place")
    cancel = {"order_id": order_id, "requested_by": {"user_id": "someone-else", "roles": ["user"]}}
    _apply(clean_db, "CancelOrder", cancel, "orders.cancel")  # someone else's order: refused as not found
    story = order_story(clean_db, order_id)
    assert story is not None and story["order"]["status"] == "pending"
    [placed] = story["transitions"]
    assert (placed["from_status"], placed["to_status"]) == (None, "pending")
    assert placed["command"]["type"] == "PlaceOrder" and placed["command"]["correlation_id"] == "corr-PlaceOrder"
    keys = [e["routing_key"] for e in story["events"]]
    assert keys == ["stock.reserve", "order.placed", "payment.start", "command.refused"]
    assert all(not e["relayed"] for e in story["events"]), "nothing was relayed: every event is still in the outbox"
    assert story["events"][0]["caused_by"]["type"] == "PlaceOrder"
    [refusal] = story["refusals"]
    assert refusal["reason"] == "not_found" and refusal["caused_by"]["type"] == "CancelOrder"
    with clean_db.begin() as conn:  # the relay confirmed the first event and deleted its row
        conn.execute(
            text("DELETE FROM outbox WHERE routing_key = 'stock.reserve' AND order_id = CAST(:o AS uuid)"),
            {"o": order_id},
        )
    assert order_story(clean_db, order_id)["events"][0]["relayed"] is True
    assert order_story(clean_db, str(uuid.uuid4())) is None


def test_orders_show_prints_the_story_and_its_json(clean_db, bus, make_place, test_env):
    import os

    order_id = str(uuid.uuid4())
    _apply(clean_db, "PlaceOrder", make_place(order_id=order_id), "orders.place")
    orders = os.path.join(os.path.dirname(os.sys.executable), "orders")
    env = {**os.environ, **test_env}
    done = subprocess.run([orders, "show", order_id, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    story = json.loads(done.stdout)
    assert story["order"]["order_id"] == order_id and story["dead_letters"] == []
    table = subprocess.run(
        [orders, "show", order_id, "--no-dead-letters"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "200"},
        timeout=120,
    )
    assert table.returncode == 0 and "∅ → pending" in table.stdout and "stock.reserve" in table.stdout
    narrow = subprocess.run(
        [orders, "show", order_id, "--no-dead-letters"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "80"},
        timeout=120,
    )
    lines = narrow.stdout.splitlines()
    assert narrow.returncode == 0 and all(len(line) <= 80 for line in lines) and "…" not in narrow.stdout, lines
    placed = story["transitions"][0]["command"]["message_id"]
    assert placed not in narrow.stdout  # a column of --wide
    wide = subprocess.run(
        [orders, "show", order_id, "--no-dead-letters", "--wide"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "80"},
        timeout=120,
    )
    assert wide.returncode == 0 and "…" not in wide.stdout
    (row,) = [line for line in wide.stdout.splitlines() if "∅ → pending" in line]
    assert placed in row and story["transitions"][0]["at"] in row and len(row) > 80  # one line, past the terminal
    missing = subprocess.run([orders, "show", str(uuid.uuid4())], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and "no order" in missing.stderr
