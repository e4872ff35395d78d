"""Operator verbs of the ``orders`` CLI: dead letters, status, doctor."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import ConfigOption, JsonOption, engine_for, load


def status(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Queue depths and consumers, outbox lag, dead letters and orders by status."""
    from worker.status import gather, render

    settings = load(config)
    report = gather(settings, engine_for(settings))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        Console().print(render(report))
    if report["errors"]:
        raise typer.Exit(1)


def doctor(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Check configuration, PostgreSQL, RabbitMQ, Redis and payment settings; say how to fix problems."""
    from worker import logs
    from worker.doctor import run_all

    logs.configure("ERROR", "console")  # a failing check is reported as a finding, not logged
    findings = run_all(config)
    problems = [f for f in findings if not f.ok]
    if as_json:
        typer.echo(json.dumps({"ok": not problems, "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        console = Console()
        table = Table("", "check", "finding", title="orders doctor", title_justify="left")
        for f in findings:
            mark = "[red]✗[/]" if not f.ok else "[yellow]![/]" if f.warning else "[green]✓[/]"
            table.add_row(mark, f.check, f.detail)
        console.print(table)
        for f in [f for f in findings if not f.ok or f.warning]:
            console.print(f"[bold]{f.check}[/]: {f.detail}\n  [bold]fix:[/] {f.fix}")
        console.print("[red]problems found[/]" if problems else "[green]all checks passed[/]")
    if problems:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the operator verbs to the main app."""
    from worker.cli.dlq import app as dlq_app

    app.add_typer(dlq_app, name="dlq")
    app.command()(status)
    app.command()(doctor)
