"""``orders show ORDER_ID``: what happened to one order, from the records the service keeps."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table

from worker.cli.common import ConfigOption, JsonOption, engine_for, fail, load
from worker.tables import plain_table, print_whole, seconds


def _dead_letters(settings: Any, order_id: str) -> list[dict[str, Any]] | str:
    """The dead letters naming the order, or why they could not be looked at."""
    from worker.dlq.letters import order_id_of
    from worker.dlq.operations import Selection, browse
    from worker.errors import BrokerError

    try:
        letters = browse(settings, Selection(everything=True))
    except BrokerError as exc:
        return f"dead-letter queue not looked at: {exc}"
    return [
        {
            "message_id": dl.delivery.message_id,
            "type": dl.delivery.message_type,
            "queue": dl.original_queue,
            "error_class": dl.error_class,
            "reason": dl.error_message,
            "attempts": dl.attempts,
        }
        for dl in letters
        if order_id_of(dl) == order_id
    ]


@dataclass(frozen=True)
class Column:
    """One column of a story's table: its header and how a row gives its cell."""

    header: str
    value: Callable[[dict[str, Any]], Any]
    #: shown by default (the narrow table); the others only with --wide
    narrow: bool = True


def _at(row: dict[str, Any]) -> Any:
    return row["at"]


def _by(key: str) -> Callable[[dict[str, Any]], Any]:
    """The type of the command in ``row[key]`` (its message id is a column of its own: :func:`_by_id`)."""
    return lambda row: row[key]["type"]


def _by_id(key: str) -> Callable[[dict[str, Any]], Any]:
    """The message id of the command in ``row[key]``."""
    return lambda row: row[key]["message_id"]


TRANSITIONS = [
    Column("at", _at),
    Column("from → to", lambda t: f"{t['from_status'] or '∅'} → {t['to_status']}"),
    Column("command", _by("command")),
    Column("message id", _by_id("command"), narrow=False),
    Column("correlation id", lambda t: t["command"]["correlation_id"], narrow=False),
    Column("reason", lambda t: t["reason"], narrow=False),
]
EVENTS = [
    Column("at", _at),
    Column("routing key", lambda e: e["routing_key"]),
    Column("event id", lambda e: e["event_id"], narrow=False),
    Column("relayed", lambda e: "yes" if e["relayed"] else "pending"),
    Column("caused by", _by("caused_by")),
    Column("message id", _by_id("caused_by"), narrow=False),
]
PAYMENTS = [
    Column("at", _at),
    Column("status", lambda p: p["status"]),
    Column("provider", lambda p: p["provider"]),
    Column("provider id", lambda p: p["provider_payment_id"]),
    Column("idempotency key", lambda p: p["idempotency_key"], narrow=False),
    Column(
        "capture / refund",
        lambda p: " / ".join(x for x in (p.get("capture_id"), p.get("refund_id")) if x),
        narrow=False,
    ),
    Column("error", lambda p: p.get("last_error"), narrow=False),
    Column("by", _by("caused_by"), narrow=False),
    Column("message id", _by_id("caused_by"), narrow=False),
]
REFUSALS = [
    Column("at", _at),
    Column("command", _by("caused_by")),
    Column("message id", _by_id("caused_by"), narrow=False),
    Column("reason", lambda r: r["reason"]),
    Column("message", lambda r: r["message"], narrow=False),
]
DEAD_LETTERS = [
    Column("message id", lambda d: d["message_id"]),
    Column("type", lambda d: d["type"]),
    Column("queue", lambda d: d["queue"], narrow=False),
    Column("error", lambda d: d["error_class"]),
    Column("reason", lambda d: d["reason"], narrow=False),
    Column("attempts", lambda d: d["attempts"], narrow=False),
]


def _table(title: str, columns: list[Column], rows: list[dict[str, Any]], wide: bool) -> Table:
    """Narrow: the default columns, times to the second in UTC; wide: every column, times as recorded."""
    shown = [c for c in columns if wide or c.narrow]
    table = plain_table(title)
    for c in shown:
        table.add_column("at (UTC)" if c.value is _at and not wide else c.header, no_wrap=True)
    for row in rows:
        values = [seconds(c.value(row)) if c.value is _at and not wide else c.value(row) for c in shown]
        table.add_row(*["" if v is None else str(v) for v in values])
    return table


def render(story: dict[str, Any], wide: bool = False) -> Group:
    """The story as tables.

    Narrow (the default) fits a terminal of 80 columns without cutting a
    cell: times to the second (UTC), commands by type, the ids an operator
    looks up (the provider's payment id, a dead letter's message id).
    ``wide``: every column (message, event and correlation ids, reasons,
    idempotency keys, capture and refund ids, errors) and times as recorded;
    print it with :func:`worker.tables.print_whole`, which lets its lines run
    past the terminal's width rather than fold.
    """
    o = story["order"]
    head = (
        f"[bold]order {o['order_id']}[/]  {o['status']}\ntotal {o['total']} {o['currency'] or ''}  user {o['user_id']}"
    )
    if o.get("shipment"):
        head += f"\nshipped with {o['shipment']['carrier']}, tracking {o['shipment']['tracking_number']}"
    parts: list[Any] = [
        _table("transitions", TRANSITIONS, story["transitions"], wide),
        _table("events", EVENTS, story["events"], wide),
        _table("payment", PAYMENTS, story["payments"], wide),
    ]
    if story["refusals"]:
        parts.append(_table("refused commands", REFUSALS, story["refusals"], wide))
    letters = story.get("dead_letters")
    if isinstance(letters, str):
        parts.append(f"[yellow]{letters}[/]")
    elif letters:
        parts.append(_table("dead letters", DEAD_LETTERS, letters, wide))
    return Group(head, *(item for part in parts for item in ("", part)))  # a blank line before each table


def show(
    order_id: Annotated[str, typer.Argument(help="The order's id.")],
    as_json: JsonOption = False,
    dead_letters: Annotated[
        bool, typer.Option("--dead-letters/--no-dead-letters", help="Also look for its dead letters in RabbitMQ.")
    ] = True,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide",
            "-w",
            help="Every column (message and event ids, reasons, idempotency keys, errors), nothing cut.",
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """What happened to an order: transitions and their commands, events, payment attempts, refusals, dead letters."""
    import uuid

    from worker.history import order_story

    try:
        order_id = str(uuid.UUID(order_id))
    except ValueError:
        fail(f"{order_id!r} is not an order id (a UUID)", 2)
    settings = load(config)
    story = order_story(engine_for(settings), order_id)
    if story is None:
        fail(f"no order {order_id}")
    if dead_letters:
        story["dead_letters"] = _dead_letters(settings, order_id)
    if as_json:
        typer.echo(json.dumps(story, indent=2, default=str))
    elif wide:
        print_whole(Console(), render(story, wide=True))
    else:
        Console().print(render(story))


def register(app: typer.Typer) -> None:
    app.command()(show)
