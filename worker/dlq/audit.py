"""The audit of dead-letter replays and purges (table ``dlq_audit``).

A row is written *before* anything moves (action, actor, the selected
message ids, "started") and completed afterwards with the ids that really
moved; a run that was killed in between stays visible as "started".
"""

from __future__ import annotations

import getpass
import json
import os
from typing import Any

from sqlalchemy import Engine, insert, select, update

from schema.tables import dlq_audit


def default_actor() -> str:
    """Who is acting: ``$USER``, else the login name."""
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def start(engine: Engine, action: str, actor: str, message_ids: list[str], detail: str) -> int:
    """Record that ``actor`` starts ``action`` on ``message_ids``; returns the row id."""
    with engine.begin() as conn:
        row_id = conn.execute(
            insert(dlq_audit)
            .values(action=action, actor=actor, message_ids=message_ids, detail=f"started: {detail}")
            .returning(dlq_audit.c.id)
        ).scalar_one()
    return int(row_id)


def finish(engine: Engine, row_id: int, moved_ids: list[str], detail: str) -> None:
    """Complete the row with the ids that really moved."""
    with engine.begin() as conn:
        conn.execute(update(dlq_audit).where(dlq_audit.c.id == row_id).values(message_ids=moved_ids, detail=detail))


def history(engine: Engine, limit: int = 50, action: str | None = None) -> list[dict[str, Any]]:
    """The latest rows, newest first."""
    query = select(dlq_audit).order_by(dlq_audit.c.id.desc()).limit(limit)
    if action:
        query = query.where(dlq_audit.c.action == action)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        {
            "id": r["id"],
            "action": r["action"],
            "actor": r["actor"],
            "at": r["at"].isoformat(),
            "message_ids": r["message_ids"] if isinstance(r["message_ids"], list) else json.loads(r["message_ids"]),
            "detail": r["detail"],
        }
        for r in rows
    ]
