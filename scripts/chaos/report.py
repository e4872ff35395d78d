"""The report: what was injected (:func:`injected_rows`) and the tables printed at the end (:func:`render`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from .config import ChaosConfig
from .driver import Buyer, Ledger
from .injector import Injector
from .observe import Snapshot
from .plan import Malformed, PlannedOrder


def injected_rows(
    cfg: ChaosConfig,
    injector: Injector,
    ledger: Ledger,
    buyer: Buyer,
    faults: dict[str, Any],
    snap: Snapshot | None,
    plan: list[PlannedOrder],
    malformed: list[Malformed],
) -> list[tuple[str, str, str, str]]:
    by = defaultdict(list)
    for inj in injector.schedule:
        by[inj.kind].append(inj)

    def done(kind: str) -> int:
        return sum(1 for i in by[kind] if i.done_at is not None and i.ok)

    def detail(kind: str) -> str:
        return "; ".join(f"{i.done_at:.0f}s {i.detail}" for i in by[kind] if i.done_at is not None)[:300]

    mode = "the machine's server" if cfg.real_restarts else "proxy cut"
    takeovers = injector.takeovers
    rows = [
        (
            "SIGKILL worker process",
            str(cfg.worker_kills),
            str(done("worker kill")),
            (
                f"pids {', '.join(map(str, injector.killed_workers[:8]))}"
                f"{' …' if len(injector.killed_workers) > 8 else ''}; the supervisor restarts them"
            ),
        ),
        (
            "SIGKILL active relay",
            str(cfg.relay_kills),
            str(done("relay kill")),
            (
                f"standby active after {min(takeovers):.1f}-{max(takeovers):.1f}s; killed relay restarted by the script"
                if takeovers
                else detail("relay kill")
            ),
        ),
        *(
            [
                (
                    "RabbitMQ leader of orders.place stopped",
                    "1",
                    str(done("rabbitmq leader stop")),
                    detail("rabbitmq leader stop"),
                ),
                ("RabbitMQ other node stopped", "1", str(done("rabbitmq node stop")), detail("rabbitmq node stop")),
                ("PostgreSQL failover", "1", str(done("postgresql failover")), detail("postgresql failover")),
            ]
            if cfg.topology == "cluster"
            else [
                ("RabbitMQ restart", "1", str(done("rabbitmq restart")), f"{mode}: {detail('rabbitmq restart')}"),
                ("PostgreSQL restart", "1", str(done("postgresql restart")), f"{mode}: {detail('postgresql restart')}"),
            ]
        ),
        ("Redis stopped", "1", str(done("redis stop")), detail("redis stop")),
        *([("RabbitMQ disk alarm", "1", str(done("rabbitmq alarm")), detail("rabbitmq alarm"))] if cfg.alarms else []),
        (
            "payment fakes failing",
            f"{cfg.fault_rate:.0%} of calls",
            "on",
            ", ".join(f"{k} {v:.0%}" for k, v in faults.items())
            + (
                f"; API calls: stripe {snap.stripe.get('api_requests')}, paypal {snap.paypal.get('api_requests')}"
                if snap
                else ""
            ),
        ),
    ]
    s = ledger.sent
    n_place = s["PlaceOrder on the bus (copy 1)"] + s["POST /orders (copy 1)"]
    rows.append(
        (
            "orders placed",
            str(cfg.orders),
            str(n_place),
            f"bus {s['PlaceOrder on the bus (copy 1)']}, shim POST /orders with JWT {s['POST /orders (copy 1)']}; "
            + ", ".join(f"{k} {v}" for k, v in sorted(Counter(o.kind for o in plan).items())),
        )
    )
    dup = (
        s["PlaceOrder on the bus (copy 2)"]
        + s["POST /orders (copy 2)"]
        + s["CancelOrder on the bus (copy 2)"]
        + s["internal PaymentConfirmed before PlaceOrder (copy 2)"]
        + s["CancelOrder racing the payment (copy 2)"]
    )
    rows.append(
        (
            "commands published twice",
            "all",
            str(dup),
            "PlaceOrder, CancelOrder, PaymentConfirmed: same message_id (shim: same Idempotency-Key)",
        )
    )
    rows.append(
        (
            "out of order (before PlaceOrder)",
            "",
            str(sum(1 for o in plan if o.cancel == "before") + sum(1 for o in plan if o.kind == "internal_early")),
            (
                f"CancelOrder {sum(1 for o in plan if o.cancel == 'before')}, PaymentConfirmed (internal, HMAC "
                f"via shim) {sum(1 for o in plan if o.kind == 'internal_early')}"
            ),
        )
    )
    kinds = Counter(o.kind for o in plan)
    ended = Counter(r["status"] for r in snap.orders.values()) if snap else Counter()
    rows.append(
        (
            "an order's whole life",
            "",
            str(
                kinds["abandoned"]
                + kinds["paypal_abandoned"]
                + kinds["late_payer"]
                + kinds["admin_cancel"]
                + kinds["refund_full"]
                + kinds["refund_partial"]
            ),
            (
                f"buyers who never pay {kinds['abandoned'] + kinds['paypal_abandoned']} and one paying in the instant "
                f"of the deadline {kinds['late_payer']} (timeout {cfg.payment_timeout_minutes:g} min; "
                f"{ended['expired']} orders expired); admin cancels {s['CancelOrder from the back office (copy 1)']}; "
                f"refunds at the provider: full {s['refunds at the provider (full)']}, "
                f"partial {s['refunds at the provider (partial)']}"
            ),
        )
    )
    rows.append(
        (
            "cancels by the owner",
            "",
            str(
                s["CancelOrder on the bus (copy 1)"]
                + s["PUT /orders/{id}/cancel accepted"]
                + s["CancelOrder racing the payment (copy 1)"]
            ),
            (
                f"bus {s['CancelOrder on the bus (copy 1)']} (some before their PlaceOrder), racing the buyer's "
                f"payment {s['CancelOrder racing the payment (copy 1)']}, shim PUT accepted "
                f"{s['PUT /orders/{id}/cancel accepted']} / answered 409-404 {sum(ledger.refused.values())}"
            ),
        )
    )
    rows.append(
        (
            "webhooks delivered three times",
            "",
            str(buyer.deliveries["stripe"] // 3 + buyer.deliveries["paypal"] // 3),
            (
                f"Stripe (3-D Secure) {buyer.deliveries['stripe']} deliveries, PayPal (approved) "
                f"{buyer.deliveries['paypal']} deliveries, signed, through the shim"
            ),
        )
    )
    cats = Counter(m.category for m in malformed)
    rows.append(
        (
            "malformed / hostile messages",
            str(cfg.malformed),
            str(sum(v for k, v in s.items() if k.startswith("malformed"))),
            ", ".join(f"{k} {v}" for k, v in cats.most_common()),
        )
    )
    return rows


def repeats(snap: Snapshot) -> dict[str, int]:
    """Events delivered more than once under the same id (at-least-once allows it; the run counts them):
    the extra deliveries, the ids concerned and the orders they belong to."""
    seen = Counter(e["message_id"] for e in snap.events)
    again = {mid for mid, n in seen.items() if n > 1}
    orders = {e["body"].get("order_id") for e in snap.events if e["message_id"] in again and e["body"]}
    return {
        "extra_deliveries": sum(n - 1 for n in seen.values()),
        "events": len(again),
        "orders": len(orders),
    }


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    t = Table(
        title=f"Chaos run — seed {result['seed']}, {result['orders']} orders, "
        + (
            "3-node RabbitMQ cluster, PostgreSQL primary + synchronous standby (scripts/cluster.sh)"
            if result.get("topology") == "cluster"
            else "real restarts"
            if result["real_restarts"]
            else "proxies + private RabbitMQ node (disk alarm) + private Redis"
            if result.get("private_rabbit")
            else "proxies + private Redis"
        ),
        show_lines=False,
    )
    for col in ("injected", "planned", "done", "detail"):
        t.add_column(col, overflow="fold")
    for row in result["injected"]:
        t.add_row(*row)
    console.print(t)
    c = Table(title="Checks")
    for col in ("check", "result", "detail"):
        c.add_column(col, overflow="fold")
    for chk in result["checks"]:
        c.add_row(chk["name"], "[green]ok[/green]" if chk["ok"] else "[red]VIOLATED[/red]", chk["detail"])
    console.print(c)
    for chk in result["checks"]:
        if not chk["ok"]:
            console.print(
                f"[red]{chk['name']}[/red] — first {min(10, len(chk['problems']))} of {len(chk['problems'])}:"
            )
            for p in chk["problems"][:10]:
                console.print("   ", p)
    rep = result.get("repeats")
    if rep is not None:
        console.print(
            f"Repeats: {rep['extra_deliveries']} extra deliveries of {rep['events']} events (same message id), "
            f"{rep['orders']} orders concerned, of {result['events_captured']} events captured"
        )
    verdict = "[green]PASSED[/green]" if result["ok"] else "[red]FAILED[/red]"
    console.print(
        f"{verdict} in {result['runtime_s']:.0f}s (load {result['load_s']:.0f}s, quiescence after "
        f"{result['quiescence_s']:.0f}s more); logs: {result['logs']}"
    )
