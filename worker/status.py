"""``orders status``: queue depths, consumers, outbox lag and orders by status.

Each source is asked on its own, so a broker that is down still leaves the
database figures (and the other way round); the problem is reported in
``errors`` and the command exits 1.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Group
from rich.table import Table
from sqlalchemy import Engine, text

from schema.tables import ORDER_STATUSES
from schema.topology import COMMAND_QUEUES, DEAD_LETTER_QUEUE, PAYMENTS_QUEUE, delay_queue
from worker.errors import BrokerError
from worker.rabbit.topology import queue_depths
from worker.settings import Settings


def _queues(settings: Settings) -> dict[str, str]:
    """queue -> role, in display order."""
    roles = {q: "commands" for q in COMMAND_QUEUES}
    roles[PAYMENTS_QUEUE] = "payments"
    roles.update({delay_queue(s): "delay" for s in settings.worker.retry_delays_seconds})
    roles[DEAD_LETTER_QUEUE] = "dead letters"
    return roles


def _database(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        backlog, age = conn.execute(
            text("SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at)) FROM outbox WHERE published_at IS NULL")
        ).one()
        counts: dict[str, int] = dict(conn.execute(text("SELECT status, count(*) FROM orders GROUP BY status")).all())
    return {
        "outbox": {"backlog": int(backlog), "lag_seconds": round(float(age), 3) if age is not None else 0.0},
        "orders": {s: int(counts.get(s, 0)) for s in ORDER_STATUSES},
    }


def gather(settings: Settings, engine: Engine) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (the ``--json`` output)."""
    report: dict[str, Any] = {
        "queues": {},
        "dead_letters": None,
        "outbox": None,
        "orders": None,
        "liveness_file_age_seconds": None,
        "errors": [],
    }
    roles = _queues(settings)
    try:
        depths = queue_depths(settings.rabbitmq.url.get_secret_value(), roles)
        for queue, role in roles.items():
            found = depths[queue]
            report["queues"][queue] = {
                "role": role,
                "messages": found[0] if found else None,
                "consumers": found[1] if found else None,
                "exists": found is not None,
            }
        dlq = depths[DEAD_LETTER_QUEUE]
        report["dead_letters"] = dlq[0] if dlq else None
    except BrokerError as exc:
        report["errors"].append(f"RabbitMQ: {exc}")
    try:
        report.update(_database(engine))
    except Exception as exc:  # noqa: BLE001 - reported, the rest still shown
        report["errors"].append(f"PostgreSQL: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    liveness = settings.worker.liveness_file
    if liveness and os.path.exists(liveness):
        # only meaningful on a worker's host: the file is local to it
        report["liveness_file_age_seconds"] = round(time.time() - os.path.getmtime(liveness), 1)
    return report


def render(report: dict[str, Any]) -> Group:
    """The report as rich tables."""
    queues = Table("queue", "role", "messages", "consumers", title="queues", title_justify="left")
    for name, q in report["queues"].items():
        missing = "[red]missing[/]"
        queues.add_row(
            name,
            q["role"],
            str(q["messages"]) if q["exists"] else missing,
            str(q["consumers"]) if q["exists"] else missing,
        )
    parts: list[Any] = [queues]
    if report["outbox"] is not None:
        box = report["outbox"]
        parts.append(f"outbox: {box['backlog']} unpublished event(s), oldest {box['lag_seconds']:.1f}s old")
    if report["orders"] is not None:
        orders = Table(*report["orders"].keys(), title="orders by status", title_justify="left")
        orders.add_row(*(str(v) for v in report["orders"].values()))
        parts.append(orders)
    if report["liveness_file_age_seconds"] is not None:
        parts.append(f"liveness file touched {report['liveness_file_age_seconds']}s ago (this host)")
    parts += [f"[red]error:[/] {e}" for e in report["errors"]]
    return Group(*parts)
