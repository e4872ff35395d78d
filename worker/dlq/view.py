"""Rendering of the ``orders dlq`` verbs with rich (tables, panels, JSON)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from worker.dlq.letters import DeadLetter
from worker.tables import cut, plain_table, print_whole


def _ago(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if when else "-"


def _age(when: datetime | None, now: datetime) -> str:
    """How long ago, in the units ``--older-than`` takes: ``45s``, ``12m``, ``3h``, ``2d``."""
    if when is None:
        return "-"
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def letters_table(letters: list[DeadLetter], title: str, wide: bool = False, now: datetime | None = None) -> Table:
    """One line per dead letter.

    Narrow (the default) fits a terminal of 80 columns: the id is always
    whole (``show``, ``replay`` and ``purge`` take it), type and error are cut
    with an ellipsis to fit, and ``age`` counts since the letter landed, as
    ``--older-than`` does.  ``wide``: every column (the original queue, both
    failure times) and nothing cut; print it with :func:`print_letters`,
    which lets its lines run past the terminal's width rather than fold.
    """
    table = plain_table(title)
    if wide:
        for header in ("id", "type", "original queue", "att.", "first failure", "last failure", "error"):
            table.add_column(header, no_wrap=True, justify="right" if header == "att." else "left")
        for dl in letters:
            table.add_row(
                dl.id,
                dl.message_type,
                dl.original_queue or "-",
                str(dl.attempts),
                _ago(dl.first_failure_at),
                _ago(dl.last_failure_at),
                Text.assemble((dl.error_class, "bold"), ": ", dl.error_message.replace("\n", " ")),
            )
        return table
    now = now or datetime.now(UTC)
    table.add_column("id", no_wrap=True)
    # type and error are not no_wrap, so the table may narrow them (error first: the widest);
    # their cells (_cut) never wrap
    table.add_column("type", max_width=16)
    table.add_column("att.", justify="right", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("error", min_width=8)
    for dl in letters:
        error = cut(f"{dl.error_class}: ", "bold")
        error.append(dl.error_message.replace("\n", " "), style="not bold")
        table.add_row(
            dl.id,
            cut(dl.message_type),
            str(dl.attempts),
            _age(dl.landed_at, now),
            error,
        )
    return table


def print_letters(
    console: Console, letters: list[DeadLetter], title: str, wide: bool = False, now: datetime | None = None
) -> None:
    """``dlq list``'s table; a wide one as wide as its longest row (like ``ps ww``), one line per letter."""
    table = letters_table(letters, title, wide, now)
    if wide:
        print_whole(console, table)
    else:
        console.print(table)


def _kv(rows: dict[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(key, "-" if value in (None, "") else str(value))
    return table


def show(console: Console, dl: DeadLetter, facts: dict[str, Any] | None, advice: str, copies: int) -> None:
    """The whole message, its error and what already happened to its order."""
    full = dl.full()
    console.print(
        Panel(
            _kv({**full["properties"], "dead-lettered by": dl.dead_lettered_by, "copies in queue": copies}),
            title=f"dead letter {dl.id}",
            title_align="left",
        )
    )
    body = (
        Syntax(json.dumps(full["body"], indent=2, ensure_ascii=False), "json")
        if full["body"] is not None
        else full["body_text"]
    )
    console.print(Panel(body, title="body", title_align="left"))
    headers = {k: v for k, v in full["headers"].items() if k != "x-error-traceback"}
    console.print(Panel(_kv(headers), title="headers", title_align="left"))
    error = [
        f"[bold red]{dl.error_class}[/]: {dl.error_message}",
        (
            f"attempts {dl.attempts}; digest {full['error_digest'] or '-'}; "
            f"first {_ago(dl.first_failure_at)}; last {_ago(dl.last_failure_at)}"
        ),
    ]
    parts: list[Any] = list(error)
    if full["traceback"]:
        parts.append(Syntax(full["traceback"], "pytb", word_wrap=True))
    console.print(Panel(Group(*parts), title="error", title_align="left"))
    if facts is not None:
        console.print(Panel(_facts(facts), title=f"order {facts['order_id'] or '(none named)'}", title_align="left"))
    console.print(f"[bold]Advice:[/] {advice}")


def _facts(facts: dict[str, Any]) -> Group:
    order, payment = facts["order"], facts["payment"]
    lines: list[Any] = [f"this message already applied: {'yes' if facts['already_applied'] else 'no'}"]
    lines.append(_kv(order) if order else "no order row: the order was never placed")
    if payment:
        lines.append(Panel(_kv(payment), title="payment", title_align="left"))
    if facts["transitions"]:
        t = Table("from", "to", "by message", "reason", "at", title="transitions", title_justify="left")
        for row in facts["transitions"]:
            t.add_row(row["from_status"] or "-", row["to_status"], row["message_id"], row["reason"] or "-", row["at"])
        lines.append(t)
    if facts["events"]:
        e = Table("exchange", "routing key", "created", "published", title="events (outbox)", title_justify="left")
        for row in facts["events"]:
            e.add_row(row["exchange"], row["routing_key"], row["created_at"], row["published_at"] or "not yet")
        lines.append(e)
    return Group(*lines)


def history_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "at", "action", "actor", "messages", "detail", title="dead-letter audit", title_justify="left")
    for r in rows:
        ids = r["message_ids"]
        shown = ", ".join(ids[:3]) + (f" … (+{len(ids) - 3})" if len(ids) > 3 else "")
        table.add_row(
            str(r["id"]),
            r["at"][:19].replace("T", " "),
            r["action"],
            r["actor"],
            f"{len(ids)}: {shown}",
            r["detail"] or "",
        )
    return table
