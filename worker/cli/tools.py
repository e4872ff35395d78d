"""Tool verbs of the ``orders`` CLI: ``audit``, ``webhook replay`` and ``asyncapi``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

webhook_app = typer.Typer(no_args_is_help=True, help="Payment provider webhooks.")


def _load(config: Optional[Path]) -> Any:
    from worker.cli.common import settings_or_exit

    return settings_or_exit(config)


def audit(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Configuration file.")] = None,
    stuck_minutes: Annotated[int, typer.Option(min=0, help="Age after which unfinished work counts as stuck.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check the database: states against history, payments and refunds, outbox, stuck work.

    Exits 1 when a guarantee is violated, 0 otherwise (stuck work is reported
    but does not fail the run).
    """
    from rich.console import Console
    from rich.table import Table

    from worker import db
    from worker.audit import check_names, run_audit

    settings = _load(config)
    findings = run_audit(db.make_engine(settings.database, pool_size=1), stuck_minutes)
    violations = [f for f in findings if f.severity == "error"]
    if as_json:
        typer.echo(
            json.dumps(
                {"ok": not violations, "checks": check_names(), "findings": [asdict(f) for f in findings]},
                default=str,
                indent=2,
            )
        )
    else:
        console = Console()
        table = Table("check", "severity", "count", "what")
        failed = {f.check: f for f in findings}
        for name in check_names():
            f = failed.get(name)
            table.add_row(name, f.severity if f else "ok", str(f.count) if f else "0", f.description if f else "")
        console.print(table)
        for f in findings:
            console.print(f"[bold]{f.check}[/bold] (first {len(f.sample)} of {f.count}):")
            for row in f.sample:
                console.print("  ", row)
    raise typer.Exit(1 if violations else 0)


@webhook_app.command("replay")
def webhook_replay(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            help='JSON: {"headers": {...}, "body": "<raw body>"}, or a PayPal delivery with transmission_* fields.',
        ),
    ],
    publish: Annotated[bool, typer.Option(help="Publish the resulting command (with a broker confirm).")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Configuration file.")] = None,
) -> None:
    """Verify a saved webhook delivery and show (or publish) the command it becomes."""
    from handlers.payments import build_gateways
    from handlers.payments.base import PaymentError, WebhookVerificationError
    from handlers.payments.webhooks import parse_webhook, to_command
    from worker.errors import BrokerError
    from worker.rabbit.connection import BlockingBroker, Outgoing

    settings = _load(config)
    body, headers = read_delivery(file)
    try:
        event = parse_webhook(build_gateways(settings), body, headers)
        command = to_command(event)  # MalformedWebhook when its command would not pass the model
    except (WebhookVerificationError, PaymentError, ValueError) as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        json.dumps(
            {"event": {**asdict(event), "kind": event.kind.value}, "command": command.as_dict() if command else None},
            indent=2,
            default=str,
        )
    )
    if publish and command is not None:
        try:
            broker = BlockingBroker(settings.rabbitmq.url.get_secret_value()).connect()
            broker.publish(
                Outgoing(
                    command.exchange,
                    command.routing_key,
                    json.dumps(command.body).encode(),
                    # as the service's own user (the webhook verified here, as the shim would)
                    {"message_id": command.message_id, "type": command.message_type, "user_id": settings.rabbitmq.user},
                )
            )
            broker.close()
        except BrokerError as exc:
            typer.echo(f"error: RabbitMQ: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"published {command.message_type} {command.message_id}")


def read_delivery(file: Path) -> tuple[bytes, dict[str, str]]:
    """Raw body and headers of a saved delivery (two shapes accepted)."""
    data = json.loads(file.read_text(encoding="utf-8"))
    if "transmission_sig" in data:  # PayPal's own test-vector shape
        headers = {
            "PAYPAL-TRANSMISSION-ID": data["transmission_id"],
            "PAYPAL-TRANSMISSION-TIME": data["transmission_time"],
            "PAYPAL-TRANSMISSION-SIG": data["transmission_sig"],
            "PAYPAL-AUTH-ALGO": data.get("auth_algo", "SHA256withRSA"),
            "PAYPAL-CERT-URL": data["cert_url"],
        }
        return data["body"].encode(), headers
    return data["body"].encode(), {str(k): str(v) for k, v in data["headers"].items()}


def asyncapi(
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write it to this file (docs/asyncapi.yaml) instead.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON (what the shim serves at /asyncapi.json).")] = False,
    check: Annotated[
        Optional[Path], typer.Option("--check", help="Compare with this file instead: exit 1 and show the diff.")
    ] = None,
) -> None:
    """Print the message contract as an AsyncAPI 3.0 document (YAML), generated from the code.

    The channels are the exchanges and routing keys of the commands, the
    internal commands and the events; the messages carry their models' JSON
    Schemas and their AMQP properties. docs/asyncapi.yaml is this output
    (--output docs/asyncapi.yaml rewrites it, --check docs/asyncapi.yaml fails
    when it is out of date); no settings or servers are needed.
    """
    import difflib

    from schema import asyncapi as spec

    text = spec.as_json().decode() + "\n" if as_json else spec.render()
    if check is not None:
        current = check.read_text() if check.exists() else ""
        if current == text:
            typer.echo(f"{check} is up to date")
            return
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), text.splitlines(keepends=True), str(check), "generated"
        )
        typer.echo("".join(diff), nl=False)
        typer.echo(
            f"{check} differs from the contract the code generates: run `orders asyncapi --output {check}`", err=True
        )
        raise typer.Exit(1)
    if output is not None:
        output.write_text(text)
        typer.echo(f"wrote {output}", err=True)
    else:
        typer.echo(text, nl=False)


def register(app: typer.Typer) -> None:
    app.command()(audit)
    app.command()(asyncapi)
    app.add_typer(webhook_app, name="webhook")
