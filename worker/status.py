"""``orders status``: queue depths, consumers, outbox lag, orders by status and the last hour.

Each source is asked on its own, so a broker that is down still leaves the
database figures (and the other way round); the problem is reported in
``errors`` and the command exits 1.  The console's at-a-glance page shows
the same report (:func:`gather`).

The last hour, minute by minute, comes from the records the service writes
in the transactions that did the work, so every process (and both the CLI
and the console) sees the same figures, whoever did the work and across
restarts, with nothing added to the worker's path:

- commands *handled*: ``inbox`` rows of the command consumer (one per command
  applied or refused, duplicates none);
- *refused*, by reason: ``order_history`` rows that record a refusal of a
  command; *applied* is handled less refused;
- *dead-lettered*: the dead letters still in the queue, by the minute they
  landed (their ``x-last-failure-at``), from the dead-letter index
  (:mod:`worker.dlq.index`); replayed or purged ones no longer count;
- *payment calls*, by provider: ``order_history`` rows of payment changes (a
  step records the answer of its call; a capture, and a start delivered a
  second time, also record their attempt before the call);
  *failures* are those declined, failed or carrying an error.  Transient
  provider errors that are retried leave no row: they are counted in
  ``orders_payment_calls_total`` only.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Group
from rich.table import Table
from sqlalchemy import Engine, text

from schema.messages import ORDER_STATUSES
from schema.topology import COMMAND_QUEUES, COMMAND_TYPES, DEAD_LETTER_QUEUE, PAYMENTS_QUEUE, delay_queue
from worker.commands import CONSUMER
from worker.dlq import index as dlq_index
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


#: minutes of the per-minute figures
WINDOW_MINUTES = 60
#: payment statuses that are failures (with any status that records an error)
FAILED_PAYMENTS = ("declined", "failed")

#: minutes before the current one after which a minute's figures are final (a transaction's rows carry the
#: time its statement ran, a moment before it commits)
SETTLE_MINUTES = 2

_HANDLED = text(
    "SELECT date_trunc('minute', processed_at) AS minute, count(*) AS n FROM inbox"
    " WHERE consumer = :consumer AND processed_at >= :since GROUP BY 1"
)
#: refusals of commands and payment changes in one pass over the hour of order_history (BRIN on ``at``)
_HISTORY = text(
    "SELECT date_trunc('minute', at) AS minute, kind,"
    " CASE WHEN kind = 'event' THEN coalesce(data->'refused'->>'reason', '?')"
    " ELSE coalesce(data->>'provider', '?') END AS what,"
    " (kind = 'payment' AND (ref = ANY(:failed) OR coalesce(data->>'last_error', '') <> '')) AS failed,"
    " count(*) AS n FROM order_history WHERE at >= :since"
    " AND (kind = 'payment' OR (data ? 'refused' AND message_type = ANY(:types))) GROUP BY 1, 2, 3, 4"
)

#: per minute: ("handled", "") | ("refused", reason) | ("calls", provider) | ("failures", provider) → count
Buckets = dict[datetime, dict[tuple[str, str], int]]


class MinuteCache:
    """The settled minutes of the last hour, for a process that shows them again and again (the console).

    A minute more than :data:`SETTLE_MINUTES` old no longer changes, so it is
    read once; each later look reads only what came after.  The CLI asks once
    and keeps nothing.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.until: datetime | None = None
        self.buckets: Buckets = {}


def _read_minutes(engine: Engine, since: datetime) -> Buckets:
    """Minute buckets from ``since`` on: the inbox and order_history, read side by side."""
    buckets: Buckets = {}

    def add(minute: datetime, key: tuple[str, str], n: int) -> None:
        slot = buckets.setdefault(minute, {})
        slot[key] = slot.get(key, 0) + n

    def inbox() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(_HANDLED, {"consumer": CONSUMER, "since": since}))

    with ThreadPoolExecutor(1) as pool:
        handled = pool.submit(inbox)
        with engine.connect() as conn:
            history = list(
                conn.execute(
                    _HISTORY, {"since": since, "types": sorted(COMMAND_TYPES), "failed": list(FAILED_PAYMENTS)}
                )
            )
        for r in handled.result():
            add(r.minute, ("handled", ""), r.n)
    for r in history:
        if r.kind == "event":
            add(r.minute, ("refused", r.what), r.n)
        else:
            add(r.minute, ("calls", r.what), r.n)
            if r.failed:
                add(r.minute, ("failures", r.what), r.n)
    return buckets


def _minute_buckets(engine: Engine, since: datetime, current: datetime, cache: MinuteCache | None) -> Buckets:
    if cache is None:
        return _read_minutes(engine, since)
    settled = current - timedelta(minutes=SETTLE_MINUTES)
    with cache.lock:
        start = since if cache.until is None or cache.until < since else cache.until
        fresh = _read_minutes(engine, start)
        for minute in [m for m in cache.buckets if m < since or m >= start]:
            del cache.buckets[minute]
        cache.buckets.update({m: b for m, b in fresh.items() if m < settled})
        cache.until = max(settled, since)
        return {**cache.buckets, **{m: b for m, b in fresh.items() if m >= settled}}


def _last_hour(engine: Engine, now: datetime, cache: MinuteCache | None = None) -> dict[str, Any]:
    """Minute by minute over the last hour, oldest first (see the module's docstring for the sources)."""
    current = now.astimezone(UTC).replace(second=0, microsecond=0)
    minutes = [current - timedelta(minutes=WINDOW_MINUTES - 1 - i) for i in range(WINDOW_MINUTES)]
    slot = {m: i for i, m in enumerate(minutes)}
    buckets = _minute_buckets(engine, minutes[0], current, cache)

    def series() -> list[int]:
        return [0] * WINDOW_MINUTES

    handled, refused, dead = series(), series(), series()
    by_reason: dict[str, int] = {}
    payments: dict[str, dict[str, Any]] = {}
    for minute, counts in buckets.items():
        i = slot.get(minute)
        if i is None:
            continue
        for (kind, what), n in counts.items():
            if kind == "handled":
                handled[i] += n
            elif kind == "refused":
                refused[i] += n
                by_reason[what] = by_reason.get(what, 0) + n
            else:
                p = payments.setdefault(
                    what, {"calls": 0, "failures": 0, "calls_per_minute": series(), "failures_per_minute": series()}
                )
                p[kind] += n
                p[f"{kind}_per_minute"][i] += n
    for minute, n in dlq_index.landed_per_minute(engine, minutes[0]).items():
        if minute in slot:
            dead[slot[minute]] += n
    index = dlq_index.state(engine)
    age = index.age_seconds(now)
    applied = [max(0, h - r) for h, r in zip(handled, refused)]
    return {
        "window_minutes": WINDOW_MINUTES,
        "minutes": [m.isoformat() for m in minutes],
        "applied": applied,
        "refused": refused,
        "dead_lettered": dead,
        "totals": {"applied": sum(applied), "refused": sum(refused), "dead_lettered": sum(dead)},
        "refused_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "payments": dict(sorted(payments.items())),
        "dead_letter_index": {
            "refreshed_at": index.refreshed_at.isoformat() if index.refreshed_at else None,
            "age_seconds": None if age is None else round(age, 1),
        },
    }


def gather(
    settings: Settings, engine: Engine, refresh_dead_letters: bool = True, minutes: MinuteCache | None = None
) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (the ``--json`` output).

    ``refresh_dead_letters``: first bring the dead-letter index up to date
    (:func:`worker.dlq.operations.refresh_index`: a passive declare, and a read
    of the queue only when it changed).  The console leaves it to its own
    refresher, so that a page never waits for the queue, and keeps the
    settled minutes of the last hour in ``minutes``.  RabbitMQ and
    PostgreSQL are asked side by side.
    """
    report: dict[str, Any] = {
        "queues": {},
        "dead_letters": None,
        "outbox": None,
        "orders": None,
        "last_hour": None,
        "liveness_file_age_seconds": None,
        "errors": [],
    }
    roles = _queues(settings)
    pool = ThreadPoolExecutor(1)
    asked = pool.submit(queue_depths, settings.rabbitmq.url.get_secret_value(), roles)
    if not refresh_dead_letters:
        _read_database(report, engine, minutes)  # meanwhile
    try:
        depths = asked.result()
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
    finally:
        pool.shutdown(wait=False)
    if refresh_dead_letters:
        if report["dead_letters"] is not None:  # the index first, then the figures
            from worker.dlq.operations import refresh_index

            try:
                refresh_index(settings, engine)
            except Exception as exc:  # noqa: BLE001 - the figures then come from the index as it was
                report["errors"].append(f"dead-letter index: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        _read_database(report, engine, minutes)
    liveness = settings.worker.liveness_file
    if liveness and os.path.exists(liveness):
        # only meaningful on a worker's host: the file is local to it
        report["liveness_file_age_seconds"] = round(time.time() - os.path.getmtime(liveness), 1)
    return report


def _read_database(report: dict[str, Any], engine: Engine, minutes: MinuteCache | None) -> None:
    try:
        report.update(_database(engine))
        report["last_hour"] = _last_hour(engine, datetime.now(UTC), minutes)
    except Exception as exc:  # noqa: BLE001 - reported, the rest still shown
        report["errors"].append(f"PostgreSQL: {type(exc).__name__}: {str(exc).splitlines()[0]}")


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
    hour = report.get("last_hour")
    if hour is not None:
        totals = hour["totals"]
        last = Table("", "last hour", "last minute", title="commands", title_justify="left")
        for name in ("applied", "refused", "dead_lettered"):
            last.add_row(name.replace("_", "-"), str(totals[name]), str(hour[name][-1]))
        parts.append(last)
        if hour["refused_by_reason"]:
            parts.append(
                "refused in the last hour: "
                + ", ".join(f"{reason} {n}" for reason, n in hour["refused_by_reason"].items())
            )
        if hour["payments"]:
            pay = Table("provider", "calls", "failures", title="payments, last hour", title_justify="left")
            for provider, p in hour["payments"].items():
                pay.add_row(provider, str(p["calls"]), str(p["failures"]))
            parts.append(pay)
    if report["liveness_file_age_seconds"] is not None:
        parts.append(f"liveness file touched {report['liveness_file_age_seconds']}s ago (this host)")
    parts += [f"[red]error:[/] {e}" for e in report["errors"]]
    return Group(*parts)
