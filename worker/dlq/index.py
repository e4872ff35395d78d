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

import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from schema.tables import dead_letter_groups as dlg
from schema.tables import dead_letter_index as dli
from schema.tables import dead_letter_index_state as dli_state
from schema.tables import dead_letter_minutes as dlm
from schema.topology import DEAD_LETTER_QUEUE
from worker.dlq.letters import DeadLetter, group_key, jsonable, order_id_of
from worker.rabbit.connection import Delivery

#: the columns :func:`store` writes, with COPY
_COLUMNS = tuple(c.name for c in dli.c if c.name != "indexed_at")
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


def _text(value: str | None) -> str | None:
    """Text PostgreSQL takes: no NUL (a dead letter may carry anything)."""
    return None if value is None else value.replace("\x00", "\ufffd")


def _json(value: Any) -> str:
    """JSON text jsonb takes: no ``\\u0000`` (jsonb refuses it)."""
    return json.dumps(jsonable(value), ensure_ascii=False, default=str).replace("\\u0000", "\\ufffd")


def _delivery_count(dl: DeadLetter) -> int:
    try:
        return int(dl.delivery.headers.get("x-delivery-count") or 0)
    except (TypeError, ValueError):
        return 0


#: COPY's text format: backslash, tab, newline and carriage return escaped (str.replace: faster than translate)
def _copy_text(value: str) -> str:
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    return value.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy_field(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bytes):
        return "\\\\x" + value.hex()  # bytea in hex, its backslash escaped for COPY
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int):
        return str(value)
    return _copy_text(str(value))


def row_of(dl: DeadLetter, position: int, copies: int, rank: int, now: datetime) -> dict[str, Any]:
    """The index row of a dead letter (the first of its ``copies``, at ``position`` in the queue)."""
    props = {k: v for k, v in dl.delivery.properties().items() if k != "headers"}
    pattern = dl.error_pattern
    return {
        "id": dl.id,
        "position": position,
        "group_rank": rank,
        "copies": copies,
        "message_id": _text(dl.delivery.message_id),
        "message_type": _text(dl.delivery.message_type),
        "original_queue": _text(dl.original_queue),
        "error_class": _text(dl.error_class[:200]),
        "error_message": _text(dl.error_message),
        "error_pattern": _text(pattern),
        "group_key": group_key(dl.original_queue, dl.error_class, pattern),
        "attempts": dl.attempts,
        "first_failure_at": dl.first_failure_at,
        "last_failure_at": dl.last_failure_at,
        "landed_at": dl.landed_at or now,
        "dead_lettered_by": dl.dead_lettered_by,
        "replay_count": dl.replay_count,
        "delivery_count": _delivery_count(dl),
        "order_id": order_id_of(dl),
        "properties": _json(props),
        "headers": _json(dl.delivery.headers),
        "body": dl.delivery.body,
    }


#: the groups, counted from the index in SQL (after a write, and after a replay or purge changed it)
_COUNT_GROUPS = text(
    "INSERT INTO dead_letter_groups (group_key, original_queue, error_class, error_pattern, example, count, ids,"
    " first_seen, last_seen, types, repeated, max_deliveries)"
    " SELECT group_key, min(original_queue), min(error_class), min(error_pattern),"
    " (array_agg(error_message ORDER BY group_rank))[1], sum(copies), count(*), min(landed_at), max(landed_at),"
    " to_jsonb(array_agg(DISTINCT coalesce(message_type, '?'))), count(*) FILTER (WHERE replay_count > 0),"
    " max(delivery_count) FROM dead_letter_index GROUP BY group_key"
)
_COUNT_MINUTES = text(
    "INSERT INTO dead_letter_minutes (minute, count) SELECT date_trunc('minute', landed_at), sum(copies)"
    " FROM dead_letter_index GROUP BY 1"
)


def _count(conn: Any) -> None:
    """The groups and the minutes of the index, counted anew (inside the transaction that changed it)."""
    conn.execute(delete(dlg))
    conn.execute(delete(dlm))
    conn.execute(_COUNT_GROUPS)
    conn.execute(_COUNT_MINUTES)


def store(engine: Engine, letters: list[DeadLetter], duration_ms: int) -> IndexState:
    """Replace the index with ``letters`` (the whole queue, in queue order) and count its groups, in one
    transaction (readers see the old index until it commits)."""
    now = datetime.now(UTC)
    first: dict[str, int] = {}
    copies: dict[str, int] = {}
    for position, dl in enumerate(letters):
        first.setdefault(dl.id, position)
        copies[dl.id] = copies.get(dl.id, 0) + 1
    ranks: dict[str, int] = {}
    lines = []
    for position, dl in enumerate(letters):
        if first[dl.id] != position:
            continue
        row = row_of(dl, position, copies[dl.id], 0, now)
        row["group_rank"] = ranks[row["group_key"]] = ranks.get(row["group_key"], -1) + 1
        lines.append("\t".join(_copy_field(row[c]) for c in _COLUMNS) + "\n")
    values = {"refreshed_at": now, "depth": len(letters), "duration_ms": duration_ms, "stale": False, "error": None}
    with engine.begin() as conn:
        conn.execute(delete(dli))
        if lines:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.copy_expert(
                    f"COPY dead_letter_index ({', '.join(_COLUMNS)}) FROM STDIN", io.StringIO("".join(lines))
                )
            finally:
                cursor.close()
        _count(conn)
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
    ids = sorted(set(moved))
    with engine.begin() as conn:
        touched = list(conn.execute(delete(dli).where(dli.c.id.in_(ids)).returning(dli.c.group_key)).scalars())
        if touched:  # the pages of a group are ranges of its ranks: close the gaps
            conn.execute(
                text(
                    "UPDATE dead_letter_index d SET group_rank = r.rank FROM (SELECT id, row_number() OVER"
                    " (PARTITION BY group_key ORDER BY position) - 1 AS rank FROM dead_letter_index"
                    " WHERE group_key = ANY(:keys)) r WHERE d.id = r.id AND d.group_rank <> r.rank"
                ),
                {"keys": sorted(set(touched))},
            )
            _count(conn)
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
    query = select(dlg).order_by(dlg.c.last_seen.desc(), dlg.c.group_key).limit(limit)
    if key is not None:
        query = query.where(dlg.c.group_key == key)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def totals(engine: Engine) -> dict[str, int]:
    """Messages (copies counted), distinct ids, repeated failures and groups in the index."""
    query = text(
        "SELECT coalesce(sum(count), 0)::int AS messages, coalesce(sum(ids), 0)::int AS ids,"
        " coalesce(sum(repeated), 0)::int AS repeated, count(*)::int AS groups FROM dead_letter_groups"
    )
    with engine.connect() as conn:
        return dict(conn.execute(query).mappings().one())


def group_letters(engine: Engine, key: str, offset: int = 0, limit: int = 50) -> list[dict[str, Any]]:
    """One page of a group's dead letters in queue order (a range of their ranks), without bodies."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(*_LISTED)
            .where(dli.c.group_key == key, dli.c.group_rank >= offset, dli.c.group_rank < offset + limit)
            .order_by(dli.c.group_rank)
        ).mappings()
        return [dict(r) for r in rows]


def group_ids(engine: Engine, key: str) -> list[str]:
    """Every id of a group, in queue order."""
    with engine.connect() as conn:
        return list(conn.execute(select(dli.c.id).where(dli.c.group_key == key).order_by(dli.c.group_rank)).scalars())


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
    with engine.connect() as conn:
        rows = conn.execute(select(dlm.c.minute, dlm.c.count).where(dlm.c.minute >= since))
        return {minute: count for minute, count in rows}
