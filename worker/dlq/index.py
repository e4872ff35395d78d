"""The dead-letter queue as last read, kept in PostgreSQL (``dead_letter_index``).

Reading RabbitMQ's dead-letter queue means taking all of it into hand (one
``orders dlq`` session at a time, :mod:`worker.rabbit.dead_letters`): a
second or two for 10,000 messages, during which no ``orders dlq`` command
runs.  A page of the console cannot do that on every view, so the console
and ``orders status`` read this index instead: one row per message id with
what a dead letter is grouped, filtered and shown by (its group, order,
landing time, body and headers).

The index is written whole by :func:`worker.dlq.operations.refresh_index`
from one read of the queue, only when the queue looks changed (its depth is
not the index's, or a dlq command marked it), never on a timer: every read
is a delivery of every message, and a quorum queue may count deliveries
(docs/operations.md, Dead letters).  A replay or purge removes what it moved
at once (:func:`forget`).  Nothing here talks to RabbitMQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from schema.tables import dead_letter_index as dli
from schema.tables import dead_letter_index_state as dli_state
from schema.topology import DEAD_LETTER_QUEUE
from worker.dlq.letters import DeadLetter, jsonable, order_id_of
from worker.rabbit.connection import Delivery

#: the columns a list of dead letters shows (all but headers, properties and body)
_LISTED = [c for c in dli.c if c.name not in ("headers", "properties", "body")]


@dataclass(frozen=True)
class IndexState:
    """When the index was written, from how deep a queue, and whether it is known to be behind."""

    refreshed_at: datetime | None
    depth: int
    duration_ms: int
    stale: bool
    error: str | None

    def age_seconds(self, now: datetime | None = None) -> float | None:
        if self.refreshed_at is None:
            return None
        return max(0.0, ((now or datetime.now(UTC)) - self.refreshed_at).total_seconds())


NEVER = IndexState(None, 0, 0, True, None)


def state(engine: Engine) -> IndexState:
    with engine.connect() as conn:
        row = conn.execute(select(dli_state).where(dli_state.c.id == 1)).first()
    if row is None:
        return NEVER
    return IndexState(row.refreshed_at, row.depth, row.duration_ms, row.stale, row.error)


def _clean(value: Any) -> Any:
    """JSON values PostgreSQL's jsonb takes: no NUL in any string (a dead letter may carry anything)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _delivery_count(dl: DeadLetter) -> int:
    try:
        return int(dl.delivery.headers.get("x-delivery-count") or 0)
    except (TypeError, ValueError):
        return 0


def row_of(dl: DeadLetter, position: int, copies: int, now: datetime) -> dict[str, Any]:
    """The index row of a dead letter (the first of its ``copies`` at ``position`` in the queue)."""
    props = {k: v for k, v in dl.delivery.properties().items() if k != "headers"}
    return {
        "id": dl.id,
        "position": position,
        "copies": copies,
        "message_id": _clean(dl.delivery.message_id),
        "message_type": _clean(dl.delivery.message_type),
        "original_queue": _clean(dl.original_queue),
        "error_class": _clean(dl.error_class)[:200],
        "error_message": _clean(dl.error_message),
        "error_pattern": _clean(dl.error_pattern),
        "group_key": dl.group,
        "attempts": dl.attempts,
        "first_failure_at": dl.first_failure_at,
        "last_failure_at": dl.last_failure_at,
        "landed_at": dl.last_failure_at or dl.first_failure_at or now,
        "dead_lettered_by": dl.dead_lettered_by,
        "replay_count": dl.replay_count,
        "delivery_count": _delivery_count(dl),
        "order_id": order_id_of(dl),
        "properties": _clean(jsonable(props)),
        "headers": _clean(jsonable(dl.delivery.headers)),
        "body": dl.delivery.body,
    }


def store(engine: Engine, letters: list[DeadLetter], duration_ms: int) -> IndexState:
    """Replace the index with ``letters`` (the whole queue, in queue order), in one transaction."""
    now = datetime.now(UTC)
    first: dict[str, int] = {}
    copies: dict[str, int] = {}
    for position, dl in enumerate(letters):
        first.setdefault(dl.id, position)
        copies[dl.id] = copies.get(dl.id, 0) + 1
    rows = [row_of(dl, pos, copies[dl.id], now) for pos, dl in enumerate(letters) if first[dl.id] == pos]
    values = {"refreshed_at": now, "depth": len(letters), "duration_ms": duration_ms, "stale": False, "error": None}
    with engine.begin() as conn:
        conn.execute(delete(dli))  # readers see the old index until this commits
        if rows:
            conn.execute(insert(dli), rows)
        conn.execute(
            pg_insert(dli_state).values(id=1, **values).on_conflict_do_update(index_elements=["id"], set_=values)
        )
    return IndexState(now, len(letters), duration_ms, False, None)


def note_error(engine: Engine, error: str) -> None:
    """The last read failed (busy, broker away): said on the page; the index stays as it was."""
    with engine.begin() as conn:
        conn.execute(
            pg_insert(dli_state)
            .values(id=1, error=error[:1000], stale=True)
            .on_conflict_do_update(index_elements=["id"], set_={"error": error[:1000]})
        )


def forget(engine: Engine, moved: list[str]) -> None:
    """Messages that left the queue (replayed, purged) leave the index, and its depth follows.

    ``moved`` names each message removed (an id twice for two copies).  When
    the index did not know them, its depth no longer matches the queue's and
    the next look reads the queue again.
    """
    if not moved:
        return
    with engine.begin() as conn:
        conn.execute(delete(dli).where(dli.c.id.in_(sorted(set(moved)))))
        conn.execute(
            update(dli_state).where(dli_state.c.id == 1).values(depth=func.greatest(dli_state.c.depth - len(moved), 0))
        )


def mark_stale(engine: Engine) -> None:
    """The queue changed in a way the index cannot follow: the next look reads it again."""
    with engine.begin() as conn:
        conn.execute(update(dli_state).where(dli_state.c.id == 1).values(stale=True))


# -- reading --------------------------------------------------------------------------------------


def groups(engine: Engine, limit: int = 500, key: str | None = None) -> list[dict[str, Any]]:
    """Groups by original queue, error class and error pattern, the most recently landed first (or one)."""
    where = " WHERE group_key = :key" if key is not None else ""
    query = text(
        "SELECT group_key, min(original_queue) AS original_queue, min(error_class) AS error_class,"
        " min(error_pattern) AS error_pattern, min(error_message) AS example, sum(copies)::int AS count,"
        " min(landed_at) AS first_seen, max(landed_at) AS last_seen,"
        " array_agg(DISTINCT coalesce(message_type, '?')) AS types,"
        " count(*) FILTER (WHERE replay_count > 0)::int AS repeated,"
        " max(delivery_count)::int AS max_deliveries"
        " FROM dead_letter_index" + where + " GROUP BY group_key ORDER BY max(landed_at) DESC, group_key LIMIT :limit"
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query, {"limit": limit, "key": key}).mappings()]


def totals(engine: Engine) -> dict[str, int]:
    """Messages (copies counted), distinct ids, repeated failures and groups in the index."""
    query = text(
        "SELECT coalesce(sum(copies), 0)::int AS messages, count(*)::int AS ids,"
        " count(*) FILTER (WHERE replay_count > 0)::int AS repeated,"
        " count(DISTINCT group_key)::int AS groups FROM dead_letter_index"
    )
    with engine.connect() as conn:
        return dict(conn.execute(query).mappings().one())


def group_letters(engine: Engine, key: str, offset: int = 0, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
    """(how many, one page of them in queue order) of a group's dead letters, without bodies."""
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(dli).where(dli.c.group_key == key)).scalar_one()
        rows = conn.execute(
            select(*_LISTED).where(dli.c.group_key == key).order_by(dli.c.position).offset(offset).limit(limit)
        ).mappings()
        return int(total), [dict(r) for r in rows]


def group_ids(engine: Engine, key: str) -> list[str]:
    """Every id of a group, in queue order."""
    with engine.connect() as conn:
        return list(conn.execute(select(dli.c.id).where(dli.c.group_key == key).order_by(dli.c.position)).scalars())


def for_order(engine: Engine, order_id: str) -> list[dict[str, Any]]:
    """The dead letters naming an order."""
    with engine.connect() as conn:
        rows = conn.execute(select(*_LISTED).where(dli.c.order_id == order_id).order_by(dli.c.position)).mappings()
        return [dict(r) for r in rows]


def letter(engine: Engine, letter_id: str) -> tuple[DeadLetter, dict[str, Any]] | None:
    """One dead letter as it was read (a :class:`DeadLetter`, as ``orders dlq show`` has it) and its row."""
    with engine.connect() as conn:
        row = conn.execute(select(dli).where(dli.c.id == letter_id)).mappings().first()
    if row is None:
        return None
    props = row["properties"]
    delivery = Delivery(
        delivery_tag=0,
        exchange="",
        routing_key="",
        queue=DEAD_LETTER_QUEUE,
        body=bytes(row["body"]),
        message_id=props.get("message_id"),
        message_type=props.get("type"),
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
        content_type=props.get("content_type"),
        headers=dict(row["headers"]),
        redelivered=False,
        timestamp=props.get("timestamp"),
        app_id=props.get("app_id"),
    )
    return DeadLetter.from_delivery(delivery), dict(row)


def landed_per_minute(engine: Engine, since: datetime) -> dict[datetime, int]:
    """Dead letters still in the queue, by the minute they landed there (copies counted)."""
    query = text(
        "SELECT date_trunc('minute', landed_at) AS minute, sum(copies)::int AS n FROM dead_letter_index"
        " WHERE landed_at >= :since GROUP BY 1"
    )
    with engine.connect() as conn:
        return {r.minute: r.n for r in conn.execute(query, {"since": since})}
