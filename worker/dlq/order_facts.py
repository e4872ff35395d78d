"""What already happened to the order a dead letter names.

``orders dlq show`` prints it so the operator can decide between replaying
(the command never took effect) and compensating (the world moved on).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from worker.commands import CONSUMER
from worker.dlq.letters import DeadLetter, order_id_of
from worker.dlq.operations import misplaced


def _rows(conn: Any, sql: str, **params: Any) -> list[dict[str, Any]]:
    return [
        {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()}
        for r in conn.execute(text(sql), params).mappings()
    ]


def order_facts(engine: Engine, dl: DeadLetter) -> dict[str, Any]:
    """Order row, payment, transitions and events of the dead letter's order, and whether it was applied."""
    order_id = order_id_of(dl)
    facts: dict[str, Any] = {
        "order_id": order_id,
        "already_applied": False,
        "order": None,
        "payment": None,
        "transitions": [],
        "events": [],
    }
    with engine.connect() as conn:
        if dl.delivery.message_id:
            facts["already_applied"] = bool(
                conn.execute(
                    text("SELECT 1 FROM inbox WHERE consumer = :c AND message_id = :m"),
                    {"c": CONSUMER, "m": dl.delivery.message_id},
                ).first()
            )
        if order_id is None:
            return facts
        found = _rows(
            conn,
            "SELECT status, user_id, total, currency, reason, created_at, updated_at "
            "FROM orders WHERE order_id = CAST(:o AS uuid)",
            o=order_id,
        )
        facts["order"] = found[0] if found else None
        payment = _rows(
            conn,
            "SELECT provider, status, amount, currency, provider_payment_id, refund_id, "
            "attempts, last_error, updated_at FROM payments WHERE order_id = CAST(:o AS uuid)",
            o=order_id,
        )
        facts["payment"] = payment[0] if payment else None
        facts["transitions"] = _rows(
            conn,
            "SELECT from_status, to_status, message_id, reason, at "
            "FROM order_transitions WHERE order_id = CAST(:o AS uuid) ORDER BY id",
            o=order_id,
        )
        facts["events"] = _rows(
            conn,
            "SELECT exchange, routing_key, message_type, created_at, published_at "
            "FROM outbox WHERE order_id = CAST(:o AS uuid) ORDER BY id",
            o=order_id,
        )
    return facts


def advice(dl: DeadLetter, facts: dict[str, Any]) -> str:
    """One plain sentence: replay, fix first, or compensate."""
    if facts["already_applied"]:
        return "Its effects are already committed (inbox): a replay changes nothing; purge it."
    wrong = misplaced(dl, None)
    if wrong is not None:
        return f"It was sent to the wrong queue: {wrong}."
    if dl.error_class in ("InvalidMessage", "ValidationError"):
        return "The message itself is malformed: fix the body with `dlq replay ID --edit`, or purge it."
    order = facts["order"]
    if dl.delivery.message_type != "PlaceOrder" and order is None:
        return "Its order does not exist (yet): replay once the PlaceOrder went through, else purge it."
    if order is not None and order["status"] in ("cancelled", "rejected", "completed", "shipped", "refunded"):
        return f"The order is already {order['status']}: check whether replaying still makes sense."
    return "Nothing of it took effect: fix the cause, then replay it."
