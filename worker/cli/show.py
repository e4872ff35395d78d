"""``orders show ORDER_ID``: what happened to one order, from the records the service keeps."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table

from worker.cli.common import ConfigOption, JsonOption, engine_for, fail, load


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


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(*columns, title=title, title_justify="left", expand=False)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    return table


def _cmd(c: dict[str, Any]) -> str:
    return " ".join(str(v) for v in (c.get("type"), c.get("message_id")) if v) or "-"


def render(story: dict[str, Any]) -> Group:
    o = story["order"]
    head = f"[bold]order {o['order_id']}[/]  {o['status']}  {o['total']} {o['currency'] or ''}  user {o['user_id']}"
    if o.get("shipment"):
        head += f"\nshipped with {o['shipment']['carrier']}, tracking {o['shipment']['tracking_number']}"
    parts: list[Any] = [head]
    parts.append(
        _table(
            "transitions",
            ["at", "from → to", "command", "correlation id", "reason"],
            [
                [
                    t["at"],
                    f"{t['from_status'] or '∅'} → {t['to_status']}",
                    _cmd(t["command"]),
                    t["command"]["correlation_id"],
                    t["reason"],
                ]
                for t in story["transitions"]
            ],
        )
    )
    parts.append(
        _table(
            "events",
            ["at", "routing key", "event id", "relayed", "caused by"],
            [
                [e["at"], e["routing_key"], e["event_id"], "yes" if e["relayed"] else "pending", _cmd(e["caused_by"])]
                for e in story["events"]
            ],
        )
    )
    parts.append(
        _table(
            "payment",
            ["at", "status", "provider", "provider id", "idempotency key", "capture / refund", "error", "by"],
            [
                [
                    p["at"],
                    p["status"],
                    p["provider"],
                    p["provider_payment_id"],
                    p["idempotency_key"],
                    " / ".join(x for x in (p.get("capture_id"), p.get("refund_id")) if x),
                    p.get("last_error"),
                    _cmd(p["caused_by"]),
                ]
                for p in story["payments"]
            ],
        )
    )
    if story["refusals"]:
        parts.append(
            _table(
                "refused commands",
                ["at", "command", "reason", "message"],
                [[r["at"], _cmd(r["caused_by"]), r["reason"], r["message"]] for r in story["refusals"]],
            )
        )
    letters = story.get("dead_letters")
    if isinstance(letters, str):
        parts.append(f"[yellow]{letters}[/]")
    elif letters:
        parts.append(
            _table(
                "dead letters",
                ["message id", "type", "queue", "error", "attempts"],
                [
                    [d["message_id"], d["type"], d["queue"], f"{d['error_class']}: {d['reason']}", d["attempts"]]
                    for d in letters
                ],
            )
        )
    return Group(*parts)


def show(
    order_id: Annotated[str, typer.Argument(help="The order's id.")],
    as_json: JsonOption = False,
    dead_letters: Annotated[
        bool, typer.Option("--dead-letters/--no-dead-letters", help="Also look for its dead letters in RabbitMQ.")
    ] = True,
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
    else:
        Console().print(render(story))


def register(app: typer.Typer) -> None:
    app.command()(show)
