"""``orders reconcile``: the money at a payment provider against the service's payments table.

Two halves.  :func:`compare` is pure: it takes what the provider holds
(:class:`ProviderPayment`, one per Stripe PaymentIntent or PayPal capture,
with its refunds) and what the service recorded (:class:`ServicePayment`,
one per order with its payment row) and returns the :class:`Mismatch` es.
The fetchers fill the two lists: :func:`fetch_provider` through the provider's
gateway (:meth:`~handlers.payments.base.PaymentGateway.payments_since`:
Stripe's list endpoints, PayPal's Transaction Search in windows of at most 31
days; the same SDK client, timeouts, retries and base URL as the payment step
uses), :func:`load_service` from PostgreSQL.  This module imports no SDK.

How the two sides meet: a Stripe payment is the PaymentIntent, whose id is
``payments.provider_payment_id`` and whose ``metadata.order_id`` is our
order; a PayPal payment is the capture, whose id is ``payments.capture_id``
and whose ``custom_id`` (Transaction Search: ``custom_field``) is our order.
The service refunds a payment in full and records it as status ``refunded``
with the provider's ``refund_id``.

The kinds of mismatch (:data:`KINDS`): money kept at the provider for an
order the service does not have (``no_order``) or on an order whose payment
does not show it (``not_shown``, e.g. a second payment that was never given
back); an order shown as paid with no money at the provider (``no_money``);
the amount or currency taken differing from the recorded payment
(``amount_differs``, ``currency_differs``); a refund at the provider that the
service did not record (``refund_not_recorded``) and a refund the service
recorded that the provider did not make (``refund_not_at_provider``).  A
payment taken and given back in full that the service never recorded (a
second payment refunded by the payment step) holds no money: not a mismatch.

Records that changed less than ``grace`` ago are left out on both sides:
a payment in flight (the webhook not yet applied) is not a mismatch, and
PayPal's Transaction Search lists a transaction up to three hours late.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select

from handlers.payments import HasGatewaySettings, build_gateway
from handlers.payments.base import PaymentError, ProviderPayment
from schema import tables

#: how long after its last change a record is compared (PayPal lists transactions up to three hours late)
DEFAULT_GRACE = {"stripe": timedelta(minutes=5), "paypal": timedelta(hours=3)}
#: how much earlier than ``since`` the provider is asked: the payment row is written before the
#: provider's record, so a row in the window may have its payment made a moment before it
SLACK = timedelta(hours=1)
#: payment statuses that say the money was taken (and kept, or given back in full)
TAKEN = frozenset({"succeeded", "refunded"})
#: order statuses that show the money taken
PAID_ORDERS = frozenset({"completed", "shipped", "refunded"})

KINDS = {
    "no_order": "money taken for an order the service does not have",
    "not_shown": "money taken on an order that does not show it",
    "no_money": "an order shown as paid with no money at the provider",
    "amount_differs": "the provider took another amount than the payment records",
    "currency_differs": "the provider took another currency than the payment records",
    "refund_not_recorded": "refunded at the provider, not recorded by the service",
    "refund_not_at_provider": "recorded as refunded, but the provider did not refund it",
}


class ReconcileError(Exception):
    """A side could not be read (provider unreachable, refused, or answering oddly)."""


@dataclass(frozen=True)
class ServicePayment:
    """One order of the service with its payment row (the ``payment_*`` fields None without one)."""

    order_id: str
    order_status: str
    order_provider: str  # the provider the order asked for
    total: int
    order_currency: str | None
    at: datetime  # the latest change of the order or its payment
    payment_provider: str | None = None  # who the payment row says took the money (shown, not trusted)
    payment_status: str | None = None
    amount: int | None = None
    currency: str | None = None
    payment_id: str | None = None  # provider_payment_id (Stripe) / capture_id (PayPal)
    refund_id: str | None = None

    @property
    def says_paid(self) -> bool:
        """Whether the service shows money taken for this order: its payment says so, or its status does."""
        return self.payment_status in TAKEN or self.order_status in PAID_ORDERS

    def claims_money(self, provider: str) -> bool:
        """Whether the service says ``provider`` took money for this order.

        Judged by the order's own provider, whatever its payment row names: an
        order placed to be paid through ``provider`` and shown as paid must have
        ``provider``'s money behind it (a row saying ``internal``, say, does not
        take it out of the comparison)."""
        return self.order_provider == provider and self.says_paid


@dataclass(frozen=True)
class Mismatch:
    kind: str
    order_id: str | None
    payment_id: str | None
    detail: str
    provider_amount: int | None = None
    provider_currency: str | None = None
    service_amount: int | None = None
    service_currency: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "meaning": KINDS[self.kind]}


@dataclass
class Report:
    provider: str
    mismatches: list[Mismatch] = field(default_factory=list)
    provider_payments: int = 0  # compared
    service_payments: int = 0  # compared
    skipped_recent: int = 0  # left out: changed within the grace

    @property
    def ok(self) -> bool:
        return not self.mismatches


def compare(
    provider: str,
    at_provider: Iterable[ProviderPayment],
    in_service: Iterable[ServicePayment],
    settled_before: datetime | None = None,
) -> Report:
    """The mismatches between the provider's payments and the service's (pure).

    Records whose ``at`` is at or after ``settled_before`` are left out, and
    with them whatever they would be compared with.
    """
    payments, orders = list(at_provider), list(in_service)
    report = Report(provider)

    def recent(at: datetime | None) -> bool:
        return settled_before is not None and at is not None and at >= settled_before

    skip_orders = {s.order_id for s in orders if recent(s.at)}
    skip_orders |= {p.order_id for p in payments if recent(p.at) and p.order_id}
    by_order = {s.order_id: s for s in orders}
    by_payment = {s.payment_id: s for s in orders if s.payment_id and s.order_provider == provider}
    matched: set[str] = set()
    for p in payments:
        s = by_payment.get(p.payment_id)
        if s is None and p.order_id not in matched:  # a row without the provider's id stands for one payment
            s = _recorded_without_id(by_order.get(p.order_id or ""), provider)
        if recent(p.at) or p.order_id in skip_orders or (s is not None and s.order_id in skip_orders):
            report.skipped_recent += 1
            continue
        report.provider_payments += 1
        if s is None:
            report.mismatches.extend(_unrecorded(p, by_order.get(p.order_id or ""), provider))
            continue
        matched.add(s.order_id)
        report.mismatches.extend(_pair(p, s, provider))
    for s in orders:
        if s.order_id in matched:
            continue
        if s.order_id in skip_orders:
            report.skipped_recent += 1
            continue
        report.service_payments += 1
        if s.claims_money(provider):
            detail = (
                f"order is {s.order_status}, payment {s.payment_status or '(none)'} "
                f"{s.payment_id or '(no id)'}: {provider} has no such payment"
            )
            report.mismatches.append(_found("no_money", s.order_id, s.payment_id, detail, s=s))
    report.service_payments += len(matched)
    return report


def _found(
    kind: str,
    order_id: str | None,
    payment_id: str | None,
    detail: str,
    p: ProviderPayment | None = None,
    s: ServicePayment | None = None,
) -> Mismatch:
    """A mismatch, with what each side says of the money."""
    return Mismatch(
        kind,
        order_id,
        payment_id,
        detail,
        provider_amount=p.amount if p else None,
        provider_currency=p.currency if p else None,
        service_amount=(s.amount if s.amount is not None else s.total) if s else None,
        service_currency=(s.currency or s.order_currency) if s else None,
    )


def _recorded_without_id(s: ServicePayment | None, provider: str) -> ServicePayment | None:
    """An order whose payment says taken but names no provider id (a PayPal capture id not recorded)."""
    if s is not None and s.payment_id is None and s.order_provider == provider and s.payment_status in TAKEN:
        return s
    return None


def _unrecorded(p: ProviderPayment, s: ServicePayment | None, provider: str) -> list[Mismatch]:
    """A provider payment no order records: a mismatch only while the provider keeps money for it."""
    if p.kept <= 0:
        return []  # never taken, or given back in full (a second payment the payment step refunded)
    kept = f"{provider} keeps {p.kept} {p.currency}" + (f" ({p.refunded} refunded)" if p.refunded else "")
    if s is None:
        said = "; the service has no such order" if p.order_id else " with no order id on it"
        return [_found("no_order", p.order_id, p.payment_id, f"{kept}{said}", p)]
    shows = f"payment {s.payment_id or '(no id)'} as {s.payment_status}" if s.payment_status else "no payment"
    return [_found("not_shown", s.order_id, p.payment_id, f"{kept}; the order ({s.order_status}) shows {shows}", p, s)]


def _pair(p: ProviderPayment, s: ServicePayment, provider: str) -> list[Mismatch]:
    """The provider's payment and the order that records it."""
    if not p.taken:
        if not s.says_paid:
            return []
        detail = f"payment recorded as {s.payment_status}, order {s.order_status}; {provider} has it as {p.status}"
        return [_found("no_money", s.order_id, p.payment_id, detail, p, s)]
    if s.payment_status not in TAKEN:
        return _unrecorded(p, s, provider)  # nothing when given back in full
    found = []
    took = f"{provider} took {p.amount} {p.currency}, the payment records {s.amount} {s.currency}"
    if p.currency != (s.currency or "").upper():
        found.append(_found("currency_differs", s.order_id, p.payment_id, took, p, s))
    elif p.amount != s.amount:
        found.append(_found("amount_differs", s.order_id, p.payment_id, took, p, s))
    if p.refunded > 0 and s.payment_status != "refunded":
        detail = (
            f"{provider} refunded {p.refunded} of {p.amount} {p.currency} ({', '.join(p.refund_ids) or 'refund'}); "
            f"the payment is {s.payment_status}, the order {s.order_status}"
        )
        found.append(_found("refund_not_recorded", s.order_id, p.payment_id, detail, p, s))
    if s.payment_status == "refunded" and p.refunded < p.amount:
        detail = (
            f"the payment is recorded as refunded ({s.refund_id or 'no refund id'}); {provider} refunded "
            f"{p.refunded} of {p.amount} {p.currency}"
        )
        found.append(_found("refund_not_at_provider", s.order_id, p.payment_id, detail, p, s))
    return found


# -- the service's side ---------------------------------------------------------------------------


def load_service(
    engine: Engine, provider: str, since: datetime, payment_ids: Iterable[str], order_ids: Iterable[str | None]
) -> list[ServicePayment]:
    """The orders to compare: those whose payment through ``provider`` started since ``since`` (or, with no
    payment row, that asked for ``provider`` and were placed since then), and any order or payment the
    provider's records name, whenever it was made."""
    o, p = tables.orders, tables.payments
    pid = p.c.capture_id if provider == "paypal" else p.c.provider_payment_id
    named_orders = sorted({i for i in order_ids if i and _is_uuid(i)})
    named_payments = sorted(set(payment_ids))
    query = (
        select(
            o.c.order_id,
            o.c.status,
            o.c.payment_provider,
            o.c.total,
            o.c.currency,
            func.greatest(o.c.updated_at, func.coalesce(p.c.updated_at, o.c.updated_at)).label("at"),
            p.c.provider,
            p.c.status.label("payment_status"),
            p.c.amount,
            p.c.currency.label("payment_currency"),
            pid.label("payment_id"),
            p.c.refund_id,
        )
        .select_from(o.outerjoin(p, p.c.order_id == o.c.order_id))
        .where(
            or_(
                and_(o.c.payment_provider == provider, p.c.created_at >= since),
                and_(p.c.order_id.is_(None), o.c.payment_provider == provider, o.c.created_at >= since),
                pid.in_(named_payments),
                o.c.order_id.in_(named_orders),
            )
        )
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        ServicePayment(
            order_id=str(r.order_id),
            order_status=r.status,
            order_provider=r.payment_provider,
            total=r.total,
            order_currency=r.currency,
            at=r.at,
            payment_provider=r.provider,
            payment_status=r.payment_status,
            amount=r.amount,
            currency=r.payment_currency,
            payment_id=r.payment_id,
            refund_id=r.refund_id,
        )
        for r in rows
    ]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# -- the provider's side --------------------------------------------------------------------------


def fetch_provider(
    settings: HasGatewaySettings, provider: str, start: datetime, page_size: int = 100
) -> list[ProviderPayment]:
    """The payments ``provider`` made or refunded since ``start``, read through its gateway."""
    gateway = build_gateway(settings, provider)
    try:
        return gateway.payments_since(start, page_size)
    except PaymentError as exc:
        raise ReconcileError(str(exc)) from None


# -- the run --------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``24h``, ``90m``, ``7d``, ``2w``, ``30s`` before now, or an ISO 8601 time (UTC when it names no zone)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(value)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration (24h, 90m, 7d) nor an ISO time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_duration(value: str) -> timedelta:
    """``5m``, ``3h``, ``0s`` as a timedelta."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration (e.g. 0s, 5m, 3h)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def run(
    settings: HasGatewaySettings,
    engine: Engine,
    provider: str,
    since: datetime,
    grace: timedelta | None = None,
    page_size: int = 100,
    now: datetime | None = None,
) -> Report:
    """Fetch both sides and compare them."""
    now = now or datetime.now(UTC)
    grace = DEFAULT_GRACE[provider] if grace is None else grace
    payments = fetch_provider(settings, provider, since - SLACK, page_size)
    service = load_service(engine, provider, since, [p.payment_id for p in payments], [p.order_id for p in payments])
    return compare(provider, payments, service, settled_before=now - grace)


__all__ = [
    "DEFAULT_GRACE",
    "KINDS",
    "Mismatch",
    "ProviderPayment",
    "ReconcileError",
    "Report",
    "ServicePayment",
    "compare",
    "fetch_provider",
    "load_service",
    "parse_duration",
    "parse_since",
    "run",
]
