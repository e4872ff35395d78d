"""``orders reconcile``: compare a provider's payments with the service's (see :mod:`worker.reconcile`)."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import ConfigOption, JsonOption, engine_for, fail, load


class Provider(str, enum.Enum):
    stripe = "stripe"
    paypal = "paypal"


def reconcile(
    provider: Annotated[Provider, typer.Option("--provider", help="The provider whose records are compared.")],
    since: Annotated[
        str, typer.Option("--since", help="How far back: a duration (24h, 90m, 7d) or an ISO 8601 time.")
    ] = "24h",
    grace: Annotated[
        Optional[str],
        typer.Option(
            "--grace",
            help=(
                "Leave out records that changed more recently than this (payments in flight; PayPal lists "
                "transactions up to 3 hours late). Default: 5m for stripe, 3h for paypal."
            ),
        ),
    ] = None,
    page_size: Annotated[int, typer.Option("--page-size", min=1, max=100, help="Records per provider page.")] = 100,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Compare the provider's payments and refunds with the payments table; exit 1 on any mismatch.

    Reports money taken with no order or on an order that does not show it, orders shown as paid with no
    money at the provider, amounts or currencies that differ, and refunds recorded on one side only.
    """
    from worker import reconcile as rec

    try:
        start = rec.parse_since(since)
        settle = rec.parse_duration(grace) if grace is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = load(config)
    try:
        report = rec.run(settings, engine_for(settings), provider.value, start, settle, page_size)
    except rec.ReconcileError as exc:
        fail(f"cannot read {provider.value}: {exc}")
    except Exception as exc:  # noqa: BLE001 - told plainly (e.g. PostgreSQL unreachable), no traceback
        fail(f"reconcile failed: {type(exc).__name__}: {exc}")
    used_grace = settle if settle is not None else rec.DEFAULT_GRACE[provider.value]
    summary: dict[str, Any] = {
        "provider": provider.value,
        "since": start.isoformat(),
        "grace_seconds": int(used_grace.total_seconds()),
        "provider_payments": report.provider_payments,
        "service_payments": report.service_payments,
        "skipped_recent": report.skipped_recent,
        "ok": report.ok,
        "mismatches": [m.as_dict() for m in report.mismatches],
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _render(summary)
    if not report.ok:
        raise typer.Exit(1)


def _render(summary: dict[str, Any]) -> None:
    console = Console()
    mismatches = summary["mismatches"]
    if mismatches:
        table = Table(
            "kind",
            "order",
            f"{summary['provider']} payment",
            "detail",
            title=f"orders reconcile: {summary['provider']} since {summary['since']}",
            title_justify="left",
        )
        for m in mismatches:
            table.add_row(f"[red]{m['kind']}[/]", m["order_id"] or "—", m["payment_id"] or "—", m["detail"])
        console.print(table)
    console.print(
        f"compared {summary['provider_payments']} {summary['provider']} payments and "
        f"{summary['service_payments']} orders since {summary['since']}; {summary['skipped_recent']} changed "
        f"within the last {summary['grace_seconds']} s, left for the next run"
    )
    if mismatches:
        kinds = sorted({m["kind"] for m in mismatches})
        console.print(f"[red]{len(mismatches)} mismatch{'es' if len(mismatches) != 1 else ''}[/] ({', '.join(kinds)})")
    else:
        console.print("[green]no mismatches[/]")


def register(app: typer.Typer) -> None:
    """Add ``orders reconcile`` to the main app."""
    app.command()(reconcile)
