"""The ``orders`` command line: run the service and operate it.

Exit codes: 0 success, 1 bad configuration or a failed check, 2 usage error
(typer), 3 the worker pool gave up on children that keep crashing at start.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from schema.topology import WORK_QUEUES
from worker.cli.common import ConfigOption, settings_or_exit, stop_on_signals
from worker.settings import Settings, SettingsError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Order service: workers, relay, shim and tools.")
products_app = typer.Typer(no_args_is_help=True, help="The product catalogue.")
app.add_typer(products_app, name="products")


@app.command()
def migrate(
    config: ConfigOption = None,
    check: Annotated[bool, typer.Option(help="Only check that the models match the migrations.")] = False,
) -> None:
    """Create the database if needed and apply the migrations (alembic upgrade head)."""
    from worker import db

    settings = settings_or_exit(config)
    try:
        if db.ensure_database(settings.database):
            typer.echo(f"created database {settings.database.dbname}")
        engine = db.make_engine(settings.database, pool_size=1)
        db.migrate(engine)
        if check:
            db.check_migrations(engine)
    except Exception as exc:  # noqa: BLE001 - told plainly, no traceback
        typer.echo(f"error: migration failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("database is at the latest migration")


@app.command()
def topology(
    config: ConfigOption = None,
    users: Annotated[
        bool,
        typer.Option(
            "--users",
            help=(
                "Instead: create or update, in the configured vhost, the service user and one user per sender of "
                "the `senders` setting (with none configured: shop, fulfilment, payments and backoffice), each "
                "with least privilege (rabbitmqctl), and print the sender map. Passwords from "
                "ORDERS_SERVICE_PASSWORD and ORDERS_PASSWORD_<USER>."
            ),
        ),
    ] = False,
    service_user: Annotated[
        Optional[str],
        typer.Option("--service-user", help="With --users: the user the service's own processes connect as."),
    ] = None,
    prefix: Annotated[
        str,
        typer.Option("--prefix", help="With --users and no sender map configured: put this before each default name."),
    ] = "",
    print_only: Annotated[
        bool,
        typer.Option(
            "--print", help="With --users: print the rabbitmqctl recipe (for a remote cluster) instead of running it."
        ),
    ] = False,
) -> None:
    """Declare the RabbitMQ exchanges, queues and bindings (safe to repeat); with --users, the broker users."""
    from worker.errors import BrokerError
    from worker.rabbit.connection import BlockingBroker
    from worker.rabbit.topology import declare_topology

    settings = settings_or_exit(config)
    if users:
        _topology_users(settings, service_user, prefix, print_only)
        return
    if service_user or prefix or print_only:
        typer.echo("error: --service-user, --prefix and --print go with --users", err=True)
        raise typer.Exit(2)
    try:
        broker = BlockingBroker(settings.rabbitmq.url.get_secret_value()).connect()
        declare_topology(broker.channel(), settings.worker.retry_delays_seconds, settings.rabbitmq.quorum_group_size)
        broker.close()
    except BrokerError as exc:
        typer.echo(f"error: RabbitMQ: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("topology declared")


def _topology_users(settings: Settings, service: str | None, prefix: str, print_only: bool) -> None:
    import os

    from worker.rabbit import users as broker_users

    if not service:
        typer.echo("error: --users needs --service-user NAME", err=True)
        raise typer.Exit(2)
    senders: dict[str, tuple[tuple[str, ...], bool, tuple[str, ...]]] = {
        user: (g.commands, g.admin, g.providers) for user, g in settings.senders.items()
    }
    if senders and prefix:
        typer.echo("error: --prefix names the default senders; the configured sender map names its own", err=True)
        raise typer.Exit(2)
    senders = senders or {prefix + name: grant for name, grant in broker_users.DEFAULT_SENDERS.items()}
    try:
        steps = broker_users.recipe(
            broker_users.vhost_of(settings.rabbitmq.url.get_secret_value()), service, list(senders)
        )
        if print_only:
            typer.echo(broker_users.render(steps), nl=False)
            return
        for line in broker_users.apply(steps, os.environ):
            typer.echo(f"rabbitmqctl {line}")
    except broker_users.UserSetupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"users set up: {service} (service), {', '.join(senders)} (senders)")
    typer.echo("the sender map (the `senders` setting; ORDERS_SENDERS takes it as JSON):")
    typer.echo(broker_users.sender_map_yaml(senders), nl=False)


@products_app.command("import")
def products_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV (with a header) or JSON list.")],
    config: ConfigOption = None,
) -> None:
    """Load a catalogue; products already there are updated (idempotent)."""
    from worker import catalogue, db

    settings = settings_or_exit(config)
    try:
        products = catalogue.read(file)
    except catalogue.CatalogueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    count = catalogue.upsert(db.make_engine(settings.database, pool_size=1), products)
    typer.echo(f"imported {count} products")


@app.command()
def worker(
    config: ConfigOption = None,
    processes: Annotated[
        Optional[int], typer.Option("--processes", "-p", min=1, help="Consumer processes (default: worker.processes).")
    ] = None,
    prefetch: Annotated[
        Optional[int], typer.Option(min=1, help="Unacked messages per process (default: worker.prefetch).")
    ] = None,
    queues: Annotated[
        Optional[list[str]],
        typer.Option(
            "--queue",
            "-q",
            # named from the topology, so a new command's queue cannot be left out of the help
            help=f"Consume only these queues (repeatable): {', '.join(WORK_QUEUES)}.",
        ),
    ] = None,
) -> None:
    """Run the worker pool: N processes consuming the command queues."""
    from schema.topology import COMMAND_QUEUES, PAYMENTS_QUEUE
    from worker.bootstrap import worker_process
    from worker.supervisor import run_pool

    settings = settings_or_exit(config, serving=True)
    overrides = {}
    if prefetch:
        overrides["prefetch"] = prefetch
    if overrides:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update=overrides)})
    known = [*COMMAND_QUEUES, PAYMENTS_QUEUE]
    for q in queues or []:
        if q not in known:
            typer.echo(f"error: unknown queue {q!r}; choose from {', '.join(known)}", err=True)
            raise typer.Exit(2)
    target = functools.partial(worker_process, queues=list(queues or []))
    raise typer.Exit(run_pool(target, settings, processes or settings.worker.processes))


@app.command()
def relay(config: ConfigOption = None) -> None:
    """Run the outbox relay (one is active; more wait as standbys)."""
    from worker import bootstrap, metrics

    settings = settings_or_exit(config, serving=True)
    stop = stop_on_signals()
    relay_port = settings.metrics.port + 1 if settings.metrics.port else 0
    try:
        metrics.serve(settings.metrics.host, relay_port)
    except OSError as exc:
        typer.echo(f"warning: metrics port {relay_port} unavailable: {exc}", err=True)
    bootstrap.relay(settings, metrics.Metrics()).run(stop)


token_app = typer.Typer(no_args_is_help=True, help="Development JWTs for the HTTP shim.")
app.add_typer(token_app, name="token")


@app.command()
def shim(
    config: ConfigOption = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default: shim.host).")] = None,
    port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="Port (default: shim.port).")] = None,
    workers: Annotated[
        Optional[int], typer.Option(min=1, help="uvicorn worker processes (default: shim.workers).")
    ] = None,
) -> None:
    """Run the HTTP shim (FastAPI on uvicorn)."""
    from worker.shim.server import serve

    settings = settings_or_exit(config, serving=True)
    port = settings.shim.port if port is None else port
    workers = settings.shim.workers if workers is None else workers
    if port == 0 and workers > 1:
        typer.echo("error: --port 0 needs a single worker (the port the workers share could not be told)", err=True)
        raise typer.Exit(2)
    serve(settings, config, host or settings.shim.host, port, workers)


@token_app.command("issue")
def token_issue(
    user: Annotated[str, typer.Option(help="The token's subject.")],
    role: Annotated[str, typer.Option(help="user or admin.")] = "user",
    ttl: Annotated[int, typer.Option(min=1, help="Lifetime in seconds.")] = 3600,
    config: ConfigOption = None,
) -> None:
    """Mint an HS256 development token signed with shim.jwt_secret."""
    from worker.shim.auth import issue_token

    try:
        typer.echo(issue_token(settings_or_exit(config).shim, user, role, ttl))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


console_app = typer.Typer(no_args_is_help=True, help="The operators' web console (/console on the shim).")
app.add_typer(console_app, name="console")


@console_app.command("login")
def console_login(
    user: Annotated[str, typer.Option(help="Who signs in (recorded in the dead-letter audit).")],
    config: ConfigOption = None,
) -> None:
    """Print a one-time login link to the console: it signs USER in as an admin, once, for a few minutes."""
    from worker.cli.common import engine_for
    from worker.shim.console.session import create_login, login_url

    settings = settings_or_exit(config)
    try:
        token = create_login(engine_for(settings), user, settings.console.login_link_seconds)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - told plainly, no traceback
        typer.echo(f"error: PostgreSQL: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    if not settings.console_enabled:
        typer.echo(
            "warning: the console is switched off in this configuration (console.enabled; off in production "
            "until set): the shim will not serve the link",
            err=True,
        )
    typer.echo(login_url(settings, token))
    minutes = settings.console.login_link_seconds / 60
    typer.echo(f"open it within {minutes:g} minute(s); it works once", err=True)


from worker.cli.ops import register as _register_ops  # noqa: E402 - after the app exists
from worker.cli.reconcile import register as _register_reconcile  # noqa: E402
from worker.cli.show import register as _register_show  # noqa: E402
from worker.cli.tools import register as _register_tools  # noqa: E402

_register_ops(app)
_register_tools(app)
_register_show(app)
_register_reconcile(app)


def main() -> None:
    try:
        app()
    except SettingsError as exc:  # pragma: no cover - raised before typer catches
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
