"""An order's whole story: ``orders show`` and ``GET /orders/{id}/history``.

Read from what the transactions that changed the order wrote with the
change: ``order_transitions`` (each status change and the command behind
it), ``order_history`` (each event published, each change of the payment),
and the outbox (whether the relay has had each event confirmed yet).  Dead
letters live in RabbitMQ, not here: ``orders show`` looks them up in the
dead-letter queue when asked.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from worker.read_model import load_views

_TRANSITIONS = text(
    "SELECT at, from_status, to_status, reason, message_id, message_type, correlation_id"
    " FROM order_transitions WHERE order_id = CAST(:id AS uuid) ORDER BY id"
)
_HISTORY = text(
    "SELECT h.at, h.kind, h.ref, h.message_id, h.message_type, h.correlation_id, h.data,"
    " (o.id IS NOT NULL AND o.published_at IS NULL) AS unpublished"
    " FROM order_history h LEFT JOIN outbox o ON o.event_id = CASE WHEN h.kind = 'event' THEN CAST(h.ref AS uuid) END"
    " WHERE h.order_id = CAST(:id AS uuid) ORDER BY h.id"
)


def _cause(r: Any) -> dict[str, Any]:
    return {"message_id": r.message_id, "type": r.message_type, "correlation_id": r.correlation_id}


def order_story(engine: Engine, order_id: str) -> dict[str, Any] | None:
    """Everything recorded about one order, oldest first; None when there is no such order."""
    view = load_views(engine, [order_id]).get(order_id)
    if view is None:
        return None
    with engine.connect() as conn:
        transitions = [
            {
                "at": r.at.isoformat(),
                "from_status": r.from_status,
                "to_status": r.to_status,
                "reason": r.reason,
                "command": _cause(r),
            }
            for r in conn.execute(_TRANSITIONS, {"id": order_id})
        ]
        rows = conn.execute(_HISTORY, {"id": order_id}).all()
    events, payments, refusals = [], [], []
    for r in rows:
        if r.kind == "event":
            event = {
                "at": r.at.isoformat(),
                "event_id": r.ref,
                "exchange": r.data["exchange"],
                "routing_key": r.data["routing_key"],
                "relayed": not r.unpublished,
                "caused_by": _cause(r),
            }
            events.append(event)
            if "reason" in r.data:
                refusals.append(
                    {
                        "at": event["at"],
                        "command": r.data.get("command"),
                        "reason": r.data["reason"],
                        "message": r.data.get("message"),
                        "caused_by": event["caused_by"],
                    }
                )
        else:
            payments.append({"at": r.at.isoformat(), **r.data, "caused_by": _cause(r)})
    return {"order": view, "transitions": transitions, "events": events, "payments": payments, "refusals": refusals}
