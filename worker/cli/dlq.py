"""``orders dlq``: list, show, replay, purge, export and history of dead letters.

Exit codes: 0 done, 1 something failed or could not be reached (details on
stderr), 2 usage (e.g. no selection given).  Logic lives in
:mod:`worker.dlq`; this module parses options and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from worker.cli.common import ConfigOption, JsonOption, engine_for, fail, load
from worker.dlq.operations import Selection

app = typer.Typer(no_args_is_help=True, help="The dead-letter queue (orders.dead-letter): inspect, replay, purge.")
out, err = Console(), Console(stderr=True)

Ids = Annotated[Optional[list[str]], typer.Argument(help="Message ids (as `dlq list` shows them).", show_default=False)]
Types = Annotated[Optional[list[str]], typer.Option("--type", "-t", help="Message type, e.g. PlaceOrder (repeatable).")]
Errors = Annotated[
    Optional[list[str]], typer.Option("--error", "-e", help="Error class, e.g. InvalidMessage (repeatable).")
]
Queues = Annotated[
    Optional[list[str]], typer.Option("--queue", "-q", help="Original queue, e.g. orders.place (repeatable).")
]
Older = Annotated[Optional[str], typer.Option(help="Dead-lettered longer ago than this (30s, 15m, 2h, 3d).")]
Newer = Annotated[Optional[str], typer.Option(help="Dead-lettered more recently than this (30s, 15m, 2h, 3d).")]
All = Annotated[bool, typer.Option("--all", help="Every message in the dead-letter queue.")]
Actor = Annotated[Optional[str], typer.Option(help="Who acts, for the audit (default: $USER).")]


def _selection(
    ids: list[str] | None,
    types: list[str] | None,
    errors: list[str] | None,
    queues: list[str] | None,
    older: str | None,
    newer: str | None,
    everything: bool = False,
) -> Selection:
    from worker.dlq.letters import parse_age

    try:
        return Selection(
            tuple(ids or ()),
            tuple(types or ()),
            tuple(errors or ()),
            tuple(queues or ()),
            parse_age(older) if older else None,
            parse_age(newer) if newer else None,
            everything,
        )
    except ValueError as exc:
        fail(str(exc), code=2)
        raise  # unreachable


def _required(selection: Selection, verb: str) -> None:
    if selection.is_empty:
        fail(
            f"say which messages to {verb}: ids, a filter (--type, --error, --queue, --older-than, "
            "--newer-than) or --all",
            code=2,
        )


def _undated(selection: Selection, ids: list[str], kept: bool) -> None:
    """Say what an age filter did with letters that carry no time (never drop one silently)."""
    from worker.dlq.operations import undated_note

    note = undated_note(selection, ids, kept)
    if note:
        err.print(f"[yellow]note:[/] {note}")


def _browse(config: Path | None, selection: Selection) -> tuple[Any, list[Any]]:
    from worker.dlq import operations as dlq
    from worker.errors import BrokerError

    settings = load(config)
    try:
        return settings, dlq.browse(settings, selection)
    except BrokerError as exc:
        fail(f"RabbitMQ: {exc}")
        raise  # unreachable


@app.command("list")
def list_(
    types: Types = None,
    errors: Errors = None,
    queues: Queues = None,
    older_than: Older = None,
    newer_than: Newer = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Show at most this many (table: 1000).")] = None,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide", "-w", help="Every column (original queue, both failure times, whole errors), nothing cut."
        ),
    ] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List dead letters, one line each (the queue is browsed, never consumed or reordered)."""
    from worker.dlq.view import print_letters

    selection = _selection(None, types, errors, queues, older_than, newer_than)
    _, letters = _browse(config, selection)
    _undated(selection, [dl.id for dl in selection.undated(letters)], kept=True)
    if as_json:  # scripts get everything unless they ask for less
        typer.echo(json.dumps([dl.summary() for dl in letters[:limit]], indent=2))
        return
    limit = limit or 1000
    title = f"{len(letters)} dead letter(s)" + (f", first {limit} shown" if len(letters) > limit else "")
    print_letters(out, letters[:limit], title, wide)


@app.command()
def show(
    message_id: Annotated[str, typer.Argument(help="The message id.")],
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """One dead letter in full, and what already happened to its order."""
    from worker.dlq.order_facts import advice, order_facts
    from worker.dlq.view import show as render

    settings, letters = _browse(config, Selection(ids=(message_id,)))
    if not letters:
        fail(f"no dead letter with id {message_id!r}")
    dl = letters[0]
    try:
        facts: dict[str, Any] | None = order_facts(engine_for(settings), dl)
    except Exception as exc:  # noqa: BLE001 - the message is still worth showing
        err.print(f"[yellow]warning:[/] cannot read the order from PostgreSQL: {type(exc).__name__}: {exc}")
        facts = None
    tip = advice(dl, facts) if facts is not None else "Check the order in PostgreSQL before replaying."
    if as_json:
        typer.echo(
            json.dumps(
                {**dl.full(), "copies": len(letters), "order_facts": facts, "advice": tip}, indent=2, default=str
            )
        )
        return
    render(out, dl, facts, tip, len(letters))


def _edit(dl: Any) -> bytes:
    """Open $EDITOR on the body; the result must pass the message model."""
    import click

    from schema.messages import InvalidMessage
    from schema.topology import parse_command

    try:
        start = json.dumps(json.loads(dl.delivery.body), indent=2, ensure_ascii=False)
    except ValueError:
        start = dl.delivery.body.decode("utf-8", "replace")
    edited = click.edit(start + "\n", extension=".json", require_save=False)
    if edited is None or not edited.strip():
        fail("editing was cancelled; nothing replayed")
    body = edited.strip().encode()
    try:
        parse_command(dl.delivery.message_type, body)
    except InvalidMessage as exc:
        fail(f"the edited body is not a valid {dl.message_type}: {exc}; nothing replayed")
    return body


@app.command()
def replay(
    ids: Ids = None,
    types: Types = None,
    errors: Errors = None,
    queues: Queues = None,
    older_than: Older = None,
    newer_than: Newer = None,
    everything: All = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would move.")] = False,
    to: Annotated[
        Optional[str], typer.Option("--to", help="Publish to this queue instead of the original exchange.")
    ] = None,
    rate: Annotated[Optional[float], typer.Option(min=0.01, help="At most N messages a second.")] = None,
    edit: Annotated[bool, typer.Option("--edit", help="Edit the body in $EDITOR first (one message).")] = False,
    actor: Actor = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Republish dead letters (confirmed) and remove them from the queue."""
    from rich.progress import Progress

    from worker.dlq import operations as dlq
    from worker.dlq.audit import default_actor
    from worker.errors import BrokerError

    selection = _selection(ids, types, errors, queues, older_than, newer_than, everything)
    _required(selection, "replay")
    settings, body = load(config), None
    if edit:
        _, found = _browse(config, selection)
        if len(found) != 1:
            fail(f"--edit needs exactly one message; the selection matches {len(found)}", code=2)
        body = _edit(found[0])
    opts = dlq.ReplayOptions(actor or default_actor(), to, rate, body, dry_run)
    with Progress(console=err, transient=True, disable=as_json) as progress:
        task = progress.add_task("replaying", total=None)
        try:
            report = dlq.replay(
                settings,
                engine_for(settings),
                selection,
                opts,
                on_start=lambda n: progress.update(task, total=n),
                on_each=lambda _dl: progress.advance(task),
            )
        except (BrokerError, ValueError) as exc:
            fail(str(exc))
    _undated(selection, report.undated, kept=True)
    if as_json:
        typer.echo(json.dumps({**report.as_dict(), "dry_run": dry_run, "ids": report.selected}, indent=2))
    elif dry_run:
        out.print(f"would replay {len(report.selected)} message(s): {', '.join(report.selected) or '-'}")
    else:
        out.print(f"replayed {len(report.moved)} of {len(report.selected)} message(s)")
        for mid, reason in report.failed:
            err.print(f"[red]not replayed[/] {mid}: {reason} (still in the dead-letter queue)")
    if report.failed or report.interrupted:
        if report.interrupted:
            err.print(f"[red]interrupted:[/] {report.interrupted}; the rest stays in the dead-letter queue")
        raise typer.Exit(1)


@app.command()
def purge(
    ids: Ids = None,
    types: Types = None,
    errors: Errors = None,
    queues: Queues = None,
    older_than: Older = None,
    newer_than: Newer = None,
    everything: All = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    export: Annotated[Optional[Path], typer.Option(help="Write the messages to this JSON lines file first.")] = None,
    actor: Actor = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Delete dead letters for good (after confirmation)."""
    from worker.dlq import operations as dlq
    from worker.dlq.audit import default_actor
    from worker.errors import BrokerError

    selection = _selection(ids, types, errors, queues, older_than, newer_than, everything)
    _required(selection, "purge")
    settings, only = load(config), None
    if not yes:
        _, found = _browse(config, selection)
        left = selection.undated(found)  # purge never goes by an age it cannot know
        _undated(selection, [dl.id for dl in left], kept=False)
        found = [dl for dl in found if dl not in left]
        if not found:
            out.print("nothing matches; nothing purged")
            return
        # purge exactly what was confirmed, not what arrives in between
        only = {dl.id for dl in found}
        if not typer.confirm(f"Purge {len(found)} dead letter(s) ({selection.describe()}) for good?", err=True):
            fail("not purged", code=1)
    try:
        report = dlq.purge(settings, engine_for(settings), selection, actor or default_actor(), export, only)
    except BrokerError as exc:
        fail(f"RabbitMQ: {exc}")
    if yes:  # asked first: the note came with the question
        _undated(selection, report.undated, kept=False)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        out.print(f"purged {len(report.moved)} message(s)" + (f", exported to {export}" if export else ""))
    if report.interrupted:
        fail(f"interrupted: {report.interrupted}")


@app.command()
def export(
    file: Annotated[Path, typer.Argument(dir_okay=False, help="JSON lines file to write.")],
    ids: Annotated[Optional[list[str]], typer.Option("--id", help="Only these ids (repeatable).")] = None,
    types: Types = None,
    errors: Errors = None,
    queues: Queues = None,
    older_than: Older = None,
    newer_than: Newer = None,
    config: ConfigOption = None,
) -> None:
    """Write dead letters (everything `show` prints) as JSON lines; the queue is unchanged."""
    from worker.dlq.operations import write_jsonl

    selection = _selection(ids, types, errors, queues, older_than, newer_than)
    _, letters = _browse(config, selection)
    _undated(selection, [dl.id for dl in selection.undated(letters)], kept=True)
    write_jsonl(letters, file)
    out.print(f"exported {len(letters)} message(s) to {file}")


@app.command()
def history(
    limit: Annotated[int, typer.Option(min=1)] = 50,
    action: Annotated[Optional[str], typer.Option(help="Only 'replay' or 'purge'.")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Who replayed or purged which dead letters, and when."""
    from worker.dlq.audit import history as rows_of
    from worker.dlq.view import history_table

    settings = load(config)
    try:
        rows = rows_of(engine_for(settings), limit, action)
    except Exception as exc:  # noqa: BLE001 - told plainly
        fail(f"PostgreSQL: {type(exc).__name__}: {exc}")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        out.print(history_table(rows))
