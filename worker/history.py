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
    "SELECT at, from_status, to_status, reason, message_id, message_type, correlation_id, events"
    " FROM order_transitions WHERE order_id = CAST(:id AS uuid) ORDER BY id"
)
_HISTORY = text(
    "SELECT at, kind, ref, message_id, message_type, correlation_id, data"
    " FROM order_history WHERE order_id = CAST(:id AS uuid) ORDER BY id"
)
#: events still waiting in the outbox for the broker's confirm (a published one is deleted or marked)
_UNPUBLISHED = text("SELECT event_id::text FROM outbox WHERE order_id = CAST(:id AS uuid) AND published_at IS NULL")


def _cause(r: Any) -> dict[str, Any]:
    return {"message_id": r.message_id, "type": r.message_type, "correlation_id": r.correlation_id}


def order_story(engine: Engine, order_id: str) -> dict[str, Any] | None:
    """Everything recorded about one order, oldest first; None when there is no such order."""
    view = load_views(engine, [order_id]).get(order_id)
    if view is None:
        return None
    with engine.connect() as conn:
        transition_rows = conn.execute(_TRANSITIONS, {"id": order_id}).all()
        rows = conn.execute(_HISTORY, {"id": order_id}).all()
        unpublished = set(conn.execute(_UNPUBLISHED, {"id": order_id}).scalars())
    transitions: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    payments: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []

    def add_events(at: str, cause: dict[str, Any], emitted: list[list[str]]) -> None:
        for exchange, routing_key, event_id in emitted:
            events.append(
                {
                    "at": at,
                    "event_id": event_id,
                    "exchange": exchange,
                    "routing_key": routing_key,
                    "relayed": event_id not in unpublished,
                    "caused_by": cause,
                }
            )

    for r in transition_rows:
        cause = _cause(r)
        at = r.at.isoformat()
        transitions.append(
            {"at": at, "from_status": r.from_status, "to_status": r.to_status, "reason": r.reason, "command": cause}
        )
        add_events(at, cause, r.events or [])
    for r in rows:
        at, cause = r.at.isoformat(), _cause(r)
        if r.kind == "event":  # the events of a message that moved no order (a refusal, a step's own)
            add_events(at, cause, r.data["events"])
            if "refused" in r.data:
                refusals.append({"at": at, **r.data["refused"], "caused_by": cause})
        else:
            payments.append({"at": at, **r.data, "caused_by": cause})
    events.sort(key=lambda e: e["at"])  # transitions and history rows interleave by time
    return {"order": view, "transitions": transitions, "events": events, "payments": payments, "refusals": refusals}
