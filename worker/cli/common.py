"""Shared bits of the operator verbs: options, settings, engine, failing plainly."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from sqlalchemy import Engine

from worker.settings import Settings, SettingsError, load_settings

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Configuration file (default: $ORDERS_CONFIG or config/config.yaml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load(config: Path | None) -> Settings:
    """Settings, with logging quiet enough for an interactive tool."""
    from worker import logs

    try:
        settings = load_settings(config)
    except SettingsError as exc:
        fail(str(exc))
    logs.configure("WARNING", settings.logging.format)
    return settings


def settings_or_exit(config: Path | None, serving: bool = False) -> Settings:
    """The settings, or exit 1 with the reason; ``serving``: also refuse what production mode refuses."""
    from worker import logs, production

    try:
        settings = load_settings(config)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if serving:
        refused = production.problems(settings)
        for problem in refused:
            typer.echo(f"error: production mode refuses {problem.line()}", err=True)
        if refused:
            typer.echo(
                "error: set these, or ORDERS_ENVIRONMENT=development for a local run "
                "(`orders doctor` lists every check)",
                err=True,
            )
            raise typer.Exit(1)
    logs.configure(settings.logging.level, settings.logging.format)
    return settings


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def engine_for(settings: Settings) -> Engine:
    from worker import db

    return db.make_engine(settings.database, pool_size=1)
