"""``orders audit``: the database side of the chaos run's checks, on a live database.

Each check is one SQL query that returns the offending rows (capped), so it
runs on a large database without loading it.  A finding is a violation
(``error``: something the guarantees say cannot happen) or a warning
(``stuck``: work that should have finished by now).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text

from handlers.orders import TRANSITIONS

#: rows shown per finding
SAMPLE = 20


@dataclass
class AuditFinding:
    check: str
    severity: str  # error | stuck
    description: str
    count: int
    sample: list[dict[str, Any]] = field(default_factory=list)


def _allowed_pairs() -> str:
    pairs = [f"('{(f.value if f else '')}', '{t.value}')" for f, targets in TRANSITIONS.items() for t in targets]
    return ", ".join(pairs)


def _checks(stuck_minutes: int) -> list[tuple[str, str, str, str]]:
    age = f"now() - interval '{int(stuck_minutes)} minutes'"
    return [
        (
            "state-matches-history",
            "error",
            "order status differs from its last recorded transition",
            "SELECT o.order_id::text, o.status, t.to_status AS last_transition FROM orders o"
            " LEFT JOIN LATERAL (SELECT to_status FROM order_transitions WHERE order_id = o.order_id"
            " ORDER BY id DESC LIMIT 1) t ON true WHERE t.to_status IS DISTINCT FROM o.status",
        ),
        (
            "transitions-allowed",
            "error",
            "a recorded transition the state machine does not allow",
            "SELECT order_id::text, from_status, to_status, message_id FROM order_transitions"
            f" WHERE (coalesce(from_status, ''), to_status) NOT IN ({_allowed_pairs()})",
        ),
        (
            "history-is-a-chain",
            "error",
            "a transition does not start where the previous one ended",
            "SELECT order_id::text, from_status, previous FROM (SELECT order_id, from_status,"
            " lag(to_status) OVER (PARTITION BY order_id ORDER BY id) AS previous, row_number()"
            " OVER (PARTITION BY order_id ORDER BY id) AS n FROM order_transitions) h"
            " WHERE n > 1 AND from_status IS DISTINCT FROM previous OR n = 1 AND from_status IS NOT NULL",
        ),
        (
            "payment-matches-order",
            "error",
            "a payment's amount or currency differs from its order",
            "SELECT p.order_id::text, p.amount, p.currency, o.total, o.currency AS order_currency"
            " FROM payments p JOIN orders o USING (order_id)"
            " WHERE p.amount <> o.total OR p.currency IS DISTINCT FROM o.currency",
        ),
        (
            "completed-orders-are-paid",
            "error",
            "a completed or shipped order without a succeeded payment",
            "SELECT o.order_id::text, o.status, p.status AS payment_status FROM orders o"
            " LEFT JOIN payments p USING (order_id) WHERE (o.status = 'completed'"
            " AND p.status IS DISTINCT FROM 'succeeded') OR (o.status = 'shipped'"
            " AND p.status NOT IN ('succeeded', 'refunded'))",
        ),
        (
            "paid-by-the-orders-provider",
            "error",
            "a completed, shipped or refunded order whose payment was not taken by the order's own provider"
            " (no order is placed to be paid internally)",
            "SELECT o.order_id::text, o.status, o.payment_provider, p.provider AS paid_by, p.provider_payment_id"
            " FROM orders o JOIN payments p USING (order_id) WHERE o.status IN ('completed', 'shipped', 'refunded')"
            " AND p.provider IS DISTINCT FROM o.payment_provider",
        ),
        (
            "money-returned-shows",
            "error",
            "money returned, but the order does not show it (neither refunded, cancelled, rejected, expired nor shipped)",
            "SELECT p.order_id::text, o.status, p.refund_id FROM payments p JOIN orders o USING (order_id)"
            " WHERE p.status = 'refunded' AND o.status NOT IN ('refunded', 'cancelled', 'rejected', 'expired',"
            " 'shipped')",
        ),
        (
            "refunded-orders-were-refunded",
            "error",
            "a refunded order whose payment was not refunded",
            "SELECT o.order_id::text, p.status AS payment_status FROM orders o LEFT JOIN payments p USING (order_id)"
            " WHERE o.status = 'refunded' AND p.status IS DISTINCT FROM 'refunded'",
        ),
        (
            "money-kept-for-ended-orders",
            "stuck",
            "money taken for a cancelled, rejected or expired order, not yet refunded",
            "SELECT p.order_id::text, o.status, p.provider, p.provider_payment_id, p.updated_at::text FROM payments p"
            " JOIN orders o USING (order_id) WHERE p.status = 'succeeded'"
            " AND o.status IN ('cancelled', 'rejected', 'expired')"
            f" AND p.updated_at < {age}",
        ),
        (
            "stock-balances",
            "error",
            "what the Inventory Service was told does not balance: reserved = released + committed, and "
            "committed = returned + still held (completed or shipped)",
            # every stock event is written with the transition that caused it (order_transitions.events), in
            # the same transaction: the ledger as it went into the outbox. Rows from before migration 0003
            # carry no events, so their orders are left out.
            "WITH ev AS (SELECT t.order_id, e->>1 AS rk, e->>2 AS id FROM order_transitions t,"
            " jsonb_array_elements(t.events) e WHERE t.events IS NOT NULL),"
            " ledger AS (SELECT order_id, count(DISTINCT id) FILTER (WHERE rk = 'stock.reserve') AS reserved,"
            " count(DISTINCT id) FILTER (WHERE rk = 'stock.release') AS released,"
            " count(DISTINCT id) FILTER (WHERE rk = 'stock.commit') AS committed,"
            " count(DISTINCT id) FILTER (WHERE rk = 'stock.return') AS returned FROM ev GROUP BY order_id)"
            " SELECT o.order_id::text, o.status, coalesce(l.reserved, 0) AS reserved,"
            " coalesce(l.released, 0) AS released, coalesce(l.committed, 0) AS committed,"
            " coalesce(l.returned, 0) AS returned FROM orders o LEFT JOIN ledger l USING (order_id)"
            " WHERE NOT EXISTS (SELECT 1 FROM order_transitions t WHERE t.order_id = o.order_id"
            " AND t.message_type IS NULL) AND (coalesce(l.reserved, 0) <> coalesce(l.released, 0)"
            " + coalesce(l.committed, 0) OR coalesce(l.committed, 0) <> coalesce(l.returned, 0)"
            " + CASE WHEN o.status IN ('completed', 'shipped') THEN 1 ELSE 0 END)",
        ),
        (
            "outbox-published",
            "stuck",
            "events not yet published by the relay",
            f"SELECT id, event_id::text, routing_key, created_at::text FROM outbox"
            f" WHERE published_at IS NULL AND created_at < {age} ORDER BY id",
        ),
        (
            "orders-not-stuck",
            "stuck",
            "orders still pending (payment never settled)",
            f"SELECT order_id::text, updated_at::text FROM orders WHERE status = 'pending' AND updated_at < {age}",
        ),
        (
            "payments-settled",
            "stuck",
            "payments whose outcome is still unknown",
            "SELECT order_id::text, status, attempts, last_error FROM payments"
            f" WHERE status IN ('started', 'unknown', 'capturing') AND updated_at < {age}",
        ),
    ]


def run_audit(engine: Engine, stuck_minutes: int = 10) -> list[AuditFinding]:
    """Run every check; return the ones that found something."""
    findings = []
    with engine.connect() as conn:
        for check, severity, description, sql in _checks(stuck_minutes):
            count = conn.execute(text(f"SELECT count(*) FROM ({sql}) AS found")).scalar_one()
            if count:
                rows = conn.execute(text(f"{sql} LIMIT {SAMPLE}")).mappings().all()
                findings.append(AuditFinding(check, severity, description, count, [dict(r) for r in rows]))
    return findings


def check_names() -> list[str]:
    return [c[0] for c in _checks(0)]
