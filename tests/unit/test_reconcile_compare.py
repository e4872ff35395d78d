"""``worker.reconcile.compare``: the provider's payments against the service's, without any server."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from worker.reconcile import ProviderPayment, ServicePayment, compare, parse_duration, parse_since

AT = datetime(2024, 5, 1, 12, tzinfo=UTC)


def paid(order_id: str = "o-1", payment_id: str | None = "pi_1", **changes: object) -> ServicePayment:
    row = ServicePayment(
        order_id=order_id,
        order_status="completed",
        order_provider="stripe",
        total=300,
        order_currency="USD",
        at=AT,
        payment_provider="stripe",
        payment_status="succeeded",
        amount=300,
        currency="USD",
        payment_id=payment_id,
    )
    return dataclasses.replace(row, **changes)  # type: ignore[arg-type]


def taken(payment_id: str = "pi_1", order_id: str | None = "o-1", **changes: object) -> ProviderPayment:
    payment = ProviderPayment(payment_id, order_id, True, 300, "USD", "succeeded", at=AT)
    return dataclasses.replace(payment, **changes)  # type: ignore[arg-type]


def kinds(provider_side: list[ProviderPayment], service_side: list[ServicePayment]) -> list[tuple[str, str | None]]:
    return sorted((m.kind, m.payment_id) for m in compare("stripe", provider_side, service_side).mismatches)


def test_agreeing_sides_report_nothing():
    report = compare("stripe", [taken()], [paid()])
    assert report.ok and (report.provider_payments, report.service_payments) == (1, 1)


@pytest.mark.parametrize(
    ("provider_side", "service_side", "expected"),
    [
        ([taken(order_id="o-unknown")], [], [("no_order", "pi_1")]),
        ([taken(order_id=None)], [], [("no_order", "pi_1")]),
        ([taken(), taken("pi_2")], [paid()], [("not_shown", "pi_2")]),
        ([taken()], [paid(payment_status="requires_action")], [("not_shown", "pi_1")]),
        ([], [paid()], [("no_money", "pi_1")]),
        ([taken(taken=False, status="requires_action")], [paid()], [("no_money", "pi_1")]),
        ([], [paid(payment_id=None, payment_provider=None, payment_status=None)], [("no_money", None)]),
        ([taken(amount=310)], [paid()], [("amount_differs", "pi_1")]),
        ([taken(currency="EUR")], [paid()], [("currency_differs", "pi_1")]),
        ([taken(refunded=100, refund_ids=("re_1",))], [paid()], [("refund_not_recorded", "pi_1")]),
        ([taken()], [paid(payment_status="refunded", refund_id="re_x")], [("refund_not_at_provider", "pi_1")]),
    ],
    ids=[
        "no-order",
        "no-order-id",
        "second-payment-kept",
        "payment-not-recorded-as-taken",
        "paid-without-provider-record",
        "paid-but-provider-did-not-take",
        "completed-without-payment-row",
        "amount",
        "currency",
        "refund-only-at-provider",
        "refund-only-in-service",
    ],
)
def test_each_kind_of_mismatch(provider_side, service_side, expected):
    assert kinds(provider_side, service_side) == expected


def test_what_holds_no_money_is_no_mismatch():
    given_back = taken("pi_2", refunded=300, refund_ids=("re_2",))  # a second payment refunded in full
    never_taken = taken("pi_3", order_id="o-gone", taken=False, status="canceled")
    cancelled = paid("o-3", "pi_4", order_status="cancelled", payment_status="cancelled")
    refunded = paid("o-4", "pi_5", order_status="refunded", payment_status="refunded", refund_id="re_5")
    assert (
        kinds(
            [
                taken(),
                given_back,
                never_taken,
                taken("pi_4", "o-3", taken=False, status="canceled"),
                taken("pi_5", "o-4", refunded=300, refund_ids=("re_5",)),
            ],
            [paid(), cancelled, refunded],
        )
        == []
    )


def test_a_row_without_the_providers_id_stands_for_one_payment_of_its_order():
    row = paid(payment_id=None, order_provider="paypal", payment_provider="paypal")
    first, second = taken("CAP1"), taken("CAP2")
    report = compare("paypal", [first, second], [row])
    assert [(m.kind, m.payment_id) for m in report.mismatches] == [("not_shown", "CAP2")]
    assert compare("paypal", [first], [row]).ok


def test_what_changed_within_the_grace_is_left_for_the_next_run_on_both_sides():
    cutoff = AT + timedelta(minutes=1)
    fresh_payment = taken("pi_9", "o-9", at=AT + timedelta(minutes=2))  # its row is not written yet
    fresh_row = paid("o-8", "pi_8", at=AT + timedelta(minutes=2))  # its payment not listed yet
    report = compare("stripe", [taken(), fresh_payment], [paid(), fresh_row], settled_before=cutoff)
    assert report.ok and report.skipped_recent == 2
    assert [m.kind for m in compare("stripe", [fresh_payment], [fresh_row]).mismatches] == ["no_order", "no_money"]


def test_since_and_grace_parse_durations_and_times():
    now = datetime(2024, 5, 2, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_since("2d", now) == datetime(2024, 4, 30, tzinfo=UTC)
    assert parse_since("2024-04-01T10:00:00", now) == datetime(2024, 4, 1, 10, tzinfo=UTC)
    assert parse_since("2024-04-01T10:00:00+02:00", now).utcoffset() == timedelta(hours=2)
    assert parse_duration("0s") == timedelta(0) and parse_duration("3h") == timedelta(hours=3)
    for bad in ("yesterday", "24", "-1h"):
        with pytest.raises(ValueError):
            parse_since(bad, now)


def test_an_order_completed_on_money_its_provider_never_took_is_no_money_whatever_its_row_says():
    """Issue 20: a forged ``internal`` confirmation once completed a Stripe order and left a payment row
    saying ``internal``, which took it out of Stripe's comparison ("no mismatches").  The order's own
    provider is what is compared."""
    internal = paid("o-2", "pay_internal", payment_provider="internal")
    assert kinds([taken()], [paid(), internal]) == [("no_money", "pay_internal")]
    # the PaymentIntent it names exists at Stripe but was never paid (3-D Secure never finished)
    forged = paid("o-5", "pi_3ds", payment_provider="internal")
    assert kinds([taken("pi_3ds", "o-5", taken=False, status="requires_action")], [forged]) == [("no_money", "pi_3ds")]
