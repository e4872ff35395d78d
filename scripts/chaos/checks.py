"""The checks on the end state (:func:`run_checks`): nothing lost, nothing applied twice, nobody charged
twice, malformed messages dead-lettered, processes alive; each a :class:`Check` with its problems.

Each check is a named function of :class:`Facts` (what the run left and knows) returning one
:class:`Check`; :data:`CHECKS` lists them in the order they are reported.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from schema.topology import DEAD_LETTER_QUEUE, INVENTORY_EXCHANGE

from .driver import Ledger
from .injector import Injector
from .observe import Snapshot
from .plan import HOSTILE_USERS, Malformed, PlannedOrder
from .processes import POOL_CHILDREN
from .stack import Stack


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    problems: list[str] = field(default_factory=list)


STATUS_EVENT = {
    "pending": "order.placed",
    "awaiting_payment": "order.awaiting_payment",
    "completed": "order.completed",
    "cancelled": "order.cancelled",
    "rejected": "order.rejected",
    "shipped": "order.shipped",
    "refunded": "order.refunded",
    "expired": "order.expired",
}
HOLDING = ("pending", "awaiting_payment")
#: statuses whose committed stock is still held (stock.commit and no stock.return)
HOLDS_COMMITTED = ("completed", "shipped")


def _check(name: str, problems: list[str], ok_detail: str) -> Check:
    if problems:
        return Check(name, False, f"{len(problems)} violation(s): " + "; ".join(problems[:3]), problems)
    return Check(name, True, ok_detail)


def _for_an_operator(dl: dict[str, Any]) -> bool:
    """A RefundPayment waiting in the dead-letter queue for a person (ManualActionRequired)."""
    return bool(dl["type"] == "RefundPayment" and dl["headers"].get("x-error-class") == "ManualActionRequired")


def handed_to_an_operator(snap: Snapshot) -> set[str]:
    """Orders whose refund an operator must make (the internal payment service's money)."""
    return {dl["order_id"] for dl in snap.dead_letters if _for_an_operator(dl)}


def expected_final(plan: PlannedOrder) -> set[str]:
    """The end states an order of this plan may reach."""
    base = {
        "visa": {"completed"},
        "declined": {"rejected"},
        "3ds": {"completed"},
        "3ds_fail": {"rejected"},
        "paypal": {"completed"},
        "paypal_decline": {"rejected"},
        "unknown_product": {"rejected"},
        "internal_early": {"completed"},
        "abandoned": {"expired"},
        "paypal_abandoned": {"expired"},
        "late_payer": {"completed", "expired"},  # the row lock decides; an expired one's money goes back
        "admin_cancel": {"cancelled"},
        "refund_full": {"refunded"},
        "refund_partial": {"completed"},
    }[plan.kind]
    if plan.cancel and plan.kind != "unknown_product":
        return base | {"cancelled"}
    return base


@dataclass
class Facts:
    """What the checks read: the end state, the plan, the driver's ledger, the stack and the injections."""

    snap: Snapshot
    plan: list[PlannedOrder]
    malformed: list[Malformed]
    ledger: Ledger
    stack: Stack
    injector: Injector
    outcomes: dict[str, Any]

    @cached_property
    def by_id(self) -> dict[str, PlannedOrder]:
        return {o.order_id: o for o in self.plan}

    @cached_property
    def event_problems(self) -> tuple[list[str], list[str], list[str]]:
        """Per order, against its history: inventory events, order events, order of first deliveries."""
        snap = self.snap
        distinct: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        first_order: dict[str, list[str]] = defaultdict(list)
        seen_ids: set[str] = set()
        stock_items: dict[str, list[Any]] = {}
        for e in snap.events:
            if e["body"] is None:
                continue
            oid = e["body"].get("order_id")
            distinct[oid][e["routing_key"]].add(e["message_id"])
            if e["message_id"] not in seen_ids:
                seen_ids.add(e["message_id"])
                first_order[oid].append(e["routing_key"])
            if e["exchange"] == INVENTORY_EXCHANGE:
                stock_items[e["message_id"]] = sorted(
                    (i["product_id"], i["quantity"]) for i in e["body"].get("items", [])
                )
        inv_problems, ev_problems, order_problems = [], [], []
        for oid, hist in snap.transitions.items():
            got = distinct.get(oid, {})
            tos = [t["to"] for t in hist]
            reserve = 1 if tos[0] == "pending" else 0
            release = sum(1 for t in hist if t["from"] in HOLDING and t["to"] in ("cancelled", "rejected", "expired"))
            commit = sum(1 for t in hist if t["to"] == "completed")
            giveback = sum(1 for t in hist if t["from"] == "completed" and t["to"] in ("cancelled", "refunded"))
            for key, want in (
                ("stock.reserve", reserve),
                ("stock.release", release),
                ("stock.commit", commit),
                ("stock.return", giveback),
            ):
                if len(got.get(key, ())) != want:
                    inv_problems.append(
                        f"order {oid}: {len(got.get(key, ()))} {key}, history says {want} ({'→'.join(tos)})"
                    )
            for key in ("stock.reserve", "stock.release", "stock.commit", "stock.return"):
                for mid in got.get(key, ()):
                    if stock_items.get(mid) != sorted(snap.items.get(oid, [])):
                        inv_problems.append(f"order {oid}: {key} items {stock_items.get(mid)} differ from the order's")
            want_events = Counter(STATUS_EVENT[t] for t in tos)
            pay = snap.payments.get(oid, {})
            # one order.refunded per refund the order shows: in full (by the service or at the provider), or
            # the one partial refund a clerk made at the provider
            want_events["order.refunded"] = 1 if pay.get("status") == "refunded" or pay.get("amount_refunded") else 0
            for key in set(want_events) | {k for k in got if k.startswith("order.")}:
                if len(got.get(key, ())) != want_events.get(key, 0):
                    ev_problems.append(
                        f"order {oid}: {len(got.get(key, ()))} {key}, history says "
                        f"{want_events.get(key, 0)} ({'→'.join(tos)})"
                    )
            firsts = [k for k in first_order.get(oid, []) if k.startswith("order.") and k != "order.refunded"]
            # order.refunded is left out on both sides: a refund may be announced apart from a transition
            if firsts != [STATUS_EVENT[t] for t in tos if t != "refunded"] and not any(
                p.startswith(f"order {oid}:") for p in ev_problems
            ):
                order_problems.append(f"order {oid}: events left as {firsts}, history is {'→'.join(tos)}")
        return inv_problems, ev_problems, order_problems

    @cached_property
    def money(self) -> list[Check]:
        return money_checks(self.snap, self.plan, self.stack.cfg.seed)

    @cached_property
    def dead_letters(self) -> tuple[dict[int, list[dict[str, Any]]], list[dict[str, Any]]]:
        """The dead letters of the malformed messages (by their index) and the others (operators' aside)."""
        by_index: dict[int, list[dict[str, Any]]] = defaultdict(list)
        unexpected = []
        for dl in self.snap.dead_letters:
            idx = dl["headers"].get("chaos-malformed")
            if _for_an_operator(dl):
                continue  # an internal payment to give back by hand (see the money check)
            if idx is None:
                unexpected.append(dl)
            else:
                by_index[int(idx)].append(dl)
        return by_index, unexpected


def check_orders_exist_once(f: Facts) -> Check:
    """Every accepted PlaceOrder became exactly one order; nothing else became one."""
    snap, ledger, by_id = f.snap, f.ledger, f.by_id
    problems = [f"order {oid} (accepted) missing" for oid in sorted(ledger.placed) if oid not in snap.orders]
    problems += [f"order {oid} exists but was never placed by the run" for oid in snap.orders if oid not in by_id]
    for oid, row in snap.orders.items():
        o = by_id.get(oid)
        if o is not None and row["place_mid"] != o.place_mid:
            problems.append(f"order {oid} placed by {row['place_mid']!r}, expected {o.place_mid!r}")
        if o is not None and row["user_id"] != o.user:
            problems.append(f"order {oid} has user {row['user_id']!r}, sent {o.user!r}")
        if o is not None and row["total"] != o.total and o.kind != "unknown_product":
            problems.append(f"order {oid} total {row['total']}, catalogue says {o.total}")
    return _check(
        "each accepted order exists once, as sent",
        problems,
        f"{len(snap.orders)} orders = {len(ledger.placed)} accepted PlaceOrders (each sent twice)",
    )


def check_commands_applied(f: Facts) -> Check:
    """Every accepted command is recorded once in the inbox (its effect committed once)."""
    problems = []
    total = 0
    for consumer, mids in f.ledger.accepted.items():
        total += len(mids)
        missing = sorted(mids - f.snap.inbox.get(consumer, set()))
        problems += [f"{consumer}: {m} accepted but never applied" for m in missing]
    return _check(
        "every accepted command applied (inbox)",
        problems,
        f"{total} distinct commands accepted (each sent 2-3 times), all in the inbox once",
    )


def check_transitions_once(f: Facts) -> Check:
    """Each message moves an order at most once; the history starts with the PlaceOrder."""
    snap = f.snap
    problems = []
    for oid, hist in snap.transitions.items():
        seen = Counter(t["message_id"] for t in hist)
        problems += [f"order {oid}: message {m} moved it {n} times" for m, n in seen.items() if n > 1]
        if hist[0]["from"] is not None or hist[0]["message_id"] != snap.orders.get(oid, {}).get("place_mid"):
            problems.append(f"order {oid}: history does not start with its PlaceOrder")
        if sum(1 for t in hist if t["from"] is None) != 1:
            problems.append(f"order {oid}: created more than once")
    problems += [f"order {oid} has no history" for oid in snap.orders if oid not in snap.transitions]
    return _check(
        "each command moved its order once",
        problems,
        f"{sum(len(h) for h in snap.transitions.values())} transitions, no message applied twice",
    )


def check_audit(f: Facts) -> Check:
    """``orders audit`` (database side: states vs history, payments vs orders, outbox, nothing stuck).

    Internal payments of ended orders are the audit's to report: they wait for an operator (their
    RefundPayment is dead-lettered with ManualActionRequired, checked with the money).
    """
    snap = f.snap
    handed = handed_to_an_operator(snap)
    kept = {
        oid
        for oid, p in snap.payments.items()
        if p["status"] == "succeeded" and snap.orders.get(oid, {}).get("status") in ("cancelled", "rejected")
    }
    all_handed = all(snap.payments[oid]["provider"] == "internal" and oid in handed for oid in kept)
    findings = [
        x
        for x in snap.audit.get("findings", [])
        if not (x["check"] == "money-kept-for-ended-orders" and x["count"] == len(kept) and all_handed)
    ]
    problems = [f"{x['check']} ({x['severity']}): {x['count']} e.g. {x['sample'][:1]}" for x in findings]
    if not snap.audit.get("ok") and not problems:
        problems.append(f"orders audit failed: {snap.audit.get('error', '?')}")
    return _check(
        "orders audit --json (stuck after 0 min)",
        problems,
        f"ok; {len(snap.audit.get('checks', []))} checks, no finding",
    )


def check_final_states(f: Facts) -> Check:
    """Each order ended where its plan and its commands allow."""
    problems = []
    for oid, row in f.snap.orders.items():
        o = f.by_id.get(oid)
        if o is None:
            continue
        allowed = expected_final(o)
        if row["status"] not in allowed:
            problems.append(
                f"order {oid} ({o.kind}{', cancel ' + o.cancel if o.cancel else ''}) is {row['status']}, "
                f"expected {' or '.join(sorted(allowed))} ({row['reason'] or 'no reason'})"
            )
    return _check(
        "every order in a state its commands allow",
        problems,
        ", ".join(f"{k} {v}" for k, v in sorted(f.outcomes.items())),
    )


def check_event_bodies(f: Facts) -> Check:
    """One body per event id; each event id names an order of the run."""
    snap = f.snap
    bodies: dict[str, bytes] = {}
    problems = []
    dupes = 0
    forged = {m.message_id for m in f.malformed if m.expect == "unauthorized"}
    for e in snap.events:
        mid = e["message_id"]
        if e["body"] is None or mid != e["body"].get("event_id"):
            problems.append(f"event {mid}: message_id and body event_id differ or body is not JSON")
            continue
        if mid in bodies:
            dupes += 1
            if bodies[mid] != e["raw"]:
                problems.append(f"event {mid} ({e['routing_key']}) seen with two different bodies")
        else:
            bodies[mid] = e["raw"]
        if e["body"].get("order_id") not in snap.orders and not (
            e["routing_key"] == "command.refused" and e["body"].get("message_id") in forged
        ):  # a forged PlaceOrder is refused before it makes an order: its refusal names the order it would have
            problems.append(f"event {mid} names unknown order {e['body'].get('order_id')}")
    return _check(
        "no event id with two different bodies",
        problems,
        f"{len(snap.events)} events captured, {len(bodies)} distinct ids, {dupes} redelivered copies identical",
    )


def check_inventory_events(f: Facts) -> Check:
    return _check(
        "inventory events match each order's history",
        f.event_problems[0],
        "reserve once, release once if cancelled/rejected/expired after reserve, commit once if paid, "
        "return once if cancelled or refunded after payment",
    )


def check_stock_balances(f: Facts) -> Check:
    """The stock ledger as the Inventory Service heard it (every distinct stock event captured), per order:
    reserved = released + committed, and committed = returned + still held (completed or shipped)."""
    heard: dict[str, Counter[str]] = defaultdict(Counter)
    seen: set[str] = set()
    for e in f.snap.events:
        if e["exchange"] == INVENTORY_EXCHANGE and e["body"] and e["message_id"] not in seen:
            seen.add(e["message_id"])
            heard[e["body"].get("order_id")][e["routing_key"]] += 1
    problems = []
    for oid, order in f.snap.orders.items():
        c = heard.get(oid, Counter())
        held = 1 if order["status"] in HOLDS_COMMITTED else 0
        if (
            c["stock.reserve"] != c["stock.release"] + c["stock.commit"]
            or c["stock.commit"] != c["stock.return"] + held
        ):
            problems.append(
                f"order {oid} ({order['status']}): reserved {c['stock.reserve']}, released {c['stock.release']}, "
                f"committed {c['stock.commit']}, returned {c['stock.return']}"
            )
    totals = Counter(k for c in heard.values() for k in c.elements())
    return _check(
        "the stock ledger balances for every order, as the Inventory Service heard it",
        problems,
        f"{len(f.snap.orders)} orders: {totals['stock.reserve']} reserved = {totals['stock.release']} released + "
        f"{totals['stock.commit']} committed; committed = {totals['stock.return']} returned + the held",
    )


def check_order_events(f: Facts) -> Check:
    return _check(
        "order events match each order's history",
        f.event_problems[1],
        "one order.<status> per transition, order.refunded once per refund",
    )


def check_event_order(f: Facts) -> Check:
    return _check(
        "events of an order leave in commit order",
        f.event_problems[2],
        "first deliveries follow each order's transitions",
    )


def check_no_double_charge(f: Facts) -> Check:
    """Nobody charged twice: the fakes' records (see :func:`money_checks`)."""
    return f.money[0]


def check_refunds(f: Facts) -> Check:
    """Refunds match payments of cancelled/rejected orders (see :func:`money_checks`)."""
    return f.money[1]


def check_money_held(f: Facts) -> Check:
    """Completed orders hold one payment, ended ones none (see :func:`money_checks`)."""
    return f.money[2]


def check_malformed_dead_lettered(f: Facts) -> Check:
    """Malformed messages: dead-lettered with a reason, never applied.  Forged ones (valid, but claiming more than
    their sender may): dead-lettered as ``Unauthorized`` and announced, or refused and announced; none applied."""
    by_index, _ = f.dead_letters
    refusals = {
        e["body"].get("message_id"): e["body"].get("reason")
        for e in f.snap.events
        if e["routing_key"] == "command.refused" and e["body"]
    }
    problems = []
    for m in f.malformed:
        found = by_index.get(m.index)
        if m.expect == "refused":
            if found:
                problems.append(f"forged #{m.index} ({m.category}) was dead-lettered, not refused")
            if refusals.get(m.message_id) != "not_found":
                problems.append(f"forged #{m.index} ({m.category}) refusal: {refusals.get(m.message_id)!r}")
            continue
        if not found:
            problems.append(f"malformed #{m.index} ({m.category}) not in the dead-letter queue")
        elif not all(d["headers"].get("x-error-class") and d["headers"].get("x-error-message") for d in found):
            problems.append(
                f"malformed #{m.index} ({m.category}) dead-lettered without a reason: {found[0]['headers']}"
            )
        elif m.expect == "unauthorized":
            if found[0]["headers"].get("x-error-class") != "Unauthorized":
                problems.append(f"forged #{m.index} ({m.category}): {found[0]['headers'].get('x-error-class')}")
            if refusals.get(m.message_id) != "unauthorized":
                problems.append(f"forged #{m.index} ({m.category}) not announced: {refusals.get(m.message_id)!r}")
    dead = [m for m in f.malformed if m.expect != "refused"]
    applied = [m for m in dead if m.message_id and m.message_id in f.snap.inbox.get("orders", set())]
    problems += [f"malformed #{m.index} ({m.category}) was applied (inbox)" for m in applied]
    extra = sum(len(v) - 1 for v in by_index.values())
    forged = Counter(m.expect for m in f.malformed if m.expect != "invalid")
    return _check(
        "every malformed message dead-lettered with a reason, every forged one refused",
        problems,
        f"{len(dead)} of {len(dead)} in {DEAD_LETTER_QUEUE} with x-error-class and x-error-message"
        + (f" ({forged['unauthorized']} as Unauthorized, announced)" if forged["unauthorized"] else "")
        + (f"; {forged['refused']} self-declared admins refused as not_found" if forged["refused"] else "")
        + (f" ({extra} twice: at-least-once after a kill)" if extra else ""),
    )


def check_no_valid_command_dead_lettered(f: Facts) -> Check:
    _, unexpected = f.dead_letters
    problems = [
        f"{d['type']} {str(d['message_id'])[:60]}: {d['headers'].get('x-error-class')}: "
        f"{str(d['headers'].get('x-error-message'))[:200]}"
        for d in unexpected
    ]
    return _check("no valid command dead-lettered", problems, "only the malformed messages are there")


def check_hostile_strings(f: Facts) -> Check:
    """Hostile but valid user ids stored verbatim; tables intact."""
    problems = []
    hostile = [o for o in f.plan if o.user in HOSTILE_USERS and o.order_id in f.ledger.placed]
    for o in hostile:
        stored = f.snap.orders.get(o.order_id)
        if stored is None or stored["user_id"] != o.user:
            problems.append(f"order {o.order_id}: user {o.user!r} stored as {stored and stored['user_id']!r}")
    for table in ("orders", "order_items", "order_transitions", "payments", "inbox", "outbox"):
        if table not in f.snap.tables:
            problems.append(f"table {table} is gone")
    return _check(
        "hostile strings stored verbatim, tables intact",
        problems,
        f"{len(hostile)} orders with SQL/script-like user ids kept them as data",
    )


def check_read_model(f: Facts) -> Check:
    """The Redis read model agrees with PostgreSQL."""
    snap = f.snap
    problems = [
        f"order {oid}: cached {status}, PostgreSQL {snap.orders[oid]['status']}"
        for oid, status in snap.read_model.items()
        if oid in snap.orders and snap.orders[oid]["status"] != status
    ]
    # a view is cached by a buyer's read (and then written through): a read answered after Redis came back
    # empty (or, with no outage, any read) must have left a view; with no such read there is none to compare
    read_at, back_at = f.ledger.last_view_at, f.injector.redis_back_at
    read_since = read_at is not None and (back_at is None or read_at > back_at)
    if not snap.read_model and read_since:
        problems.append("no order views cached at the end, although buyers read their orders after Redis came back")
    ok_detail = (
        f"{len(snap.read_model)} cached views, all current"
        if snap.read_model or read_since
        else "no views to compare: no buyer read an order after Redis came back"
    )
    return _check("Redis read model agrees with PostgreSQL", problems, ok_detail)


def check_processes(f: Facts) -> Check:
    """Processes alive, restarted by the supervisor (worker processes) or the script (relays) only."""
    stack, injector = f.stack, f.injector
    problems = []
    pool = stack.pool
    assert pool is not None
    if not pool.alive() or pool.starts != 1:
        problems.append("the worker pool supervisor died (it is never restarted by the script)")
    kids = pool.children(POOL_CHILDREN) if pool.alive() else []
    if len(kids) != stack.cfg.processes:
        problems.append(f"{len(kids)} worker processes alive, expected {stack.cfg.processes}")
    restarts = [e for e in pool.log_events() if e.get("event") == "worker process died; restarting"]
    killed = set(injector.killed_workers)
    unexplained = [e for e in restarts if e.get("pid") not in killed]
    problems += [f"worker pid {e.get('pid')} died on its own (exit code {e.get('exitcode')})" for e in unexplained]
    if len(restarts) - len(unexplained) < len(killed):
        problems.append(f"{len(killed)} workers killed, the supervisor restarted {len(restarts) - len(unexplained)}")
    for relay in stack.relays:
        if not relay.alive():
            problems.append(f"{relay.name} is not running")
        if relay.starts - 1 > sum(1 for i in injector.schedule if i.kind == "relay kill"):
            problems.append(f"{relay.name} was started {relay.starts} times")
    if stack.shim is None or not stack.shim.alive():
        problems.append("the shim died")
    return _check(
        "no process restarted by hand",
        problems,
        f"pool and {len(stack.relays)} relays alive; {len(restarts)} worker restarts by the "
        f"supervisor = {len(killed)} kills; relays restarted only after the script's kills",
    )


def check_driver_gave_up_nothing(f: Facts) -> Check:
    """The driver: every command eventually accepted."""
    return _check(
        "every command eventually accepted by the service",
        list(f.ledger.gave_up),
        f"{sum(f.ledger.sent.values())} sends, none given up",
    )


#: the checks, in the order they are reported
CHECKS: tuple[Callable[[Facts], Check], ...] = (
    check_orders_exist_once,
    check_commands_applied,
    check_transitions_once,
    check_audit,
    check_final_states,
    check_event_bodies,
    check_inventory_events,
    check_stock_balances,
    check_order_events,
    check_event_order,
    check_no_double_charge,
    check_refunds,
    check_money_held,
    check_malformed_dead_lettered,
    check_no_valid_command_dead_lettered,
    check_hostile_strings,
    check_read_model,
    check_processes,
    check_driver_gave_up_nothing,
)


def run_checks(
    snap: Snapshot,
    plan: list[PlannedOrder],
    malformed: list[Malformed],
    ledger: Ledger,
    stack: Stack,
    injector: Injector,
    outcomes: dict[str, Any],
) -> list[Check]:
    """Each of :data:`CHECKS` on the end state, in order."""
    facts = Facts(snap, plan, malformed, ledger, stack, injector, outcomes)
    return [check(facts) for check in CHECKS]


@dataclass(frozen=True)
class Money:
    """One order's money at one payment fake (its ``/_fake/charges`` record), alike for Stripe and PayPal."""

    attempts: int  # PaymentIntents / PayPal orders made for the order
    taken: int  # charges / captures
    amount: Any  # taken in all, as the fake writes amounts
    refunds: int
    amount_refunded: Any

    @property
    def held(self) -> int:
        """Payments whose money the provider still holds: one refunded in part still holds the rest."""
        given_back = self.refunds
        if self.refunds and self.taken == self.refunds and float(self.amount_refunded) < float(self.amount):
            given_back -= 1
        return self.taken - given_back


NO_MONEY = Money(0, 0, 0, 0, 0)


def _paypal_value(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _same_value(amount: str, value: str) -> bool:
    return float(amount) == float(value)


@dataclass(frozen=True)
class MoneyTerms:
    """Where the providers differ for the money check: the fake's keys, the words, amounts, refund rules."""

    provider: str
    #: the record's keys of Money's fields, in their order
    keys: tuple[str, str, str, str, str]
    attempts: str  # what the attempts are called
    verb: str  # "charged" / "captured"
    noun: str  # "charge" / "capture"
    #: an order total (cents) as the fake writes amounts, and whether an amount equals it
    total: Callable[[int], Any]
    same_amount: Callable[[Any, Any], bool]
    #: a refund of a completed order gives back a second payment (the order was paid another way meanwhile):
    #: not a refund of the order; the money it holds is checked per order
    second_payments: bool
    #: a refund must give back the whole amount taken
    full_refunds: bool

    def read(self, record: dict[str, Any]) -> Money:
        return Money(*(record[key] for key in self.keys))


#: Stripe counts cents; PayPal writes decimal strings ("12.34"), compared as numbers, and its refunds are
#: not compared with the capture
MONEY_TERMS = (
    MoneyTerms(
        "stripe",
        ("payment_intents", "charges", "amount_charged", "refunds", "amount_refunded"),
        "PaymentIntents",
        "charged",
        "charge",
        total=int,
        same_amount=operator.eq,
        second_payments=True,
        full_refunds=True,
    ),
    MoneyTerms(
        "paypal",
        ("orders", "captures", "amount_captured", "refunds", "amount_refunded"),
        "PayPal orders",
        "captured",
        "capture",
        total=_paypal_value,
        same_amount=_same_value,
        second_payments=False,
        full_refunds=False,
    ),
)


def money_checks(snap: Snapshot, plan: list[PlannedOrder], seed: int) -> list[Check]:
    """Nobody charged twice, charges match orders, refunds match ended, refunded or partly refunded orders, and
    what the provider gave back is what the order records; no money kept by an order that ended."""
    partly = {o.order_id for o in plan if o.kind == "refund_partial"}
    charge_problems, refund_problems, paid_problems = [], [], []
    fakes = {"stripe": snap.stripe, "paypal": snap.paypal}
    money = {
        t.provider: {oid: t.read(c) for oid, c in fakes[t.provider].get("orders", {}).items()} for t in MONEY_TERMS
    }
    charged = refunded = 0
    for terms in MONEY_TERMS:
        name = terms.provider
        for oid, m in money[name].items():
            order = snap.orders.get(oid)
            pay = snap.payments.get(oid, {})
            if m.attempts > 1:
                charge_problems.append(f"{name}: order {oid} has {m.attempts} {terms.attempts}")
            if m.taken > 1:
                charge_problems.append(f"{name}: order {oid} {terms.verb} {m.taken} times")
            if order is None:
                if m.taken:
                    charge_problems.append(f"{name}: {terms.noun} for unknown order {oid!r}")
                continue
            total = terms.total(order["total"])
            if m.taken:
                charged += 1
                if not terms.same_amount(m.amount, total):
                    charge_problems.append(f"{name}: order {oid} {terms.verb} {m.amount}, total {total}")
            if m.refunds > 1:
                refund_problems.append(f"{name}: order {oid} refunded {m.refunds} times")
            if m.refunds and oid in partly and order["status"] == "completed":
                refunded += 1  # a clerk's partial refund at the provider: recorded on the payment, to the cent
                if (
                    m.refunds != 1
                    or pay.get("status") != "succeeded"
                    or pay.get("amount_refunded") != m.amount_refunded
                ):
                    refund_problems.append(
                        f"{name}: order {oid} partly refunded {m.amount_refunded} at the provider, the payment "
                        f"({pay.get('status')}) records {pay.get('amount_refunded')}"
                    )
            elif m.refunds and terms.second_payments and order["status"] == "completed":
                pass  # a second payment given back (paid another way meanwhile): the net is checked below
            elif m.refunds:
                refunded += 1
                partial = terms.full_refunds and m.amount_refunded != m.amount
                if (
                    order["status"] not in ("cancelled", "rejected", "refunded", "expired")
                    or pay.get("status") != "refunded"
                    or partial
                ):
                    refund_problems.append(
                        f"{name}: order {oid} ({order['status']}, payment {pay.get('status')}) refunded"
                        + (f" {m.amount_refunded} of {m.amount}" if terms.full_refunds else "")
                    )
    # money held per order: net charges at the fakes plus a confirmation from the internal payment service
    internal_events = {f"chaos-{seed}-intpay-{o.index}" for o in plan if o.kind == "internal_early"}
    # money the internal payment service took for an order that ended: the service cannot refund it
    # itself, so the RefundPayment waits in the dead-letter queue for a person (ManualActionRequired)
    manual = handed_to_an_operator(snap)
    for oid, row in snap.orders.items():
        pay = snap.payments.get(oid, {})
        internal = pay.get("confirmed_event_id") in internal_events or any(
            t["message_id"] in internal_events for t in snap.transitions.get(oid, [])
        )
        held = {t.provider: money[t.provider].get(oid, NO_MONEY).held for t in MONEY_TERMS}
        held["internal"] = 1 if internal and pay.get("status") != "refunded" else 0
        where = ", ".join(f"{k} {v}" for k, v in held.items() if v)
        if row["status"] == "completed" and sum(held.values()) != 1:
            paid_problems.append(
                f"order {oid} completed holding {sum(held.values())} payments ({where or 'none'}; "
                f"payment row {pay.get('status')} {pay.get('pid')})"
            )
        if row["status"] in ("cancelled", "rejected") and held["internal"] and oid in manual:
            held["internal"] = 0  # handed to an operator, with the reason
        if row["status"] in ("cancelled", "rejected", "expired", "refunded") and sum(held.values()) != 0:
            paid_problems.append(
                f"order {oid} {row['status']} but money kept ({where}; payment row "
                f"{pay.get('status')} {pay.get('pid')}: {str(pay.get('last_error') or '')[:120]})"
            )
    db_refunds = sum(1 for p in snap.payments.values() if p["status"] == "refunded" or p.get("amount_refunded"))
    if db_refunds != refunded:
        refund_problems.append(f"{db_refunds} payments refunded in PostgreSQL, {refunded} refunds at the fakes")
    return [
        _check(
            "no order charged twice (fakes' records)",
            charge_problems,
            f"{charged} orders charged once each; one PaymentIntent / PayPal order per order",
        ),
        _check(
            "every refund matches a payment on an ended, refunded or partly refunded order",
            refund_problems,
            f"{refunded} refunds: the full payment of a cancelled, rejected, expired or refunded order, or the "
            f"recorded part of a paid one ({len(partly)} partial refunds planned)",
        ),
        _check(
            "completed orders paid once; ended orders keep no money",
            paid_problems,
            "each completed order holds exactly one payment (Stripe, PayPal or internal); "
            "cancelled, rejected, expired and refunded orders hold none"
            + (f" ({len(manual)} internal refunds handed to an operator)" if manual else ""),
        ),
    ]
