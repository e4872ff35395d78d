"""``orders show``'s tables: whole cells at 80 columns by default, every column with ``--wide``."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from worker.cli.show import render
from worker.tables import print_whole

ORDER = "5b0c6f8e-4c8e-4a57-9d1e-2f1f1f1f1f1f"
PLACE = {"type": "PlaceOrder", "message_id": "0f7e4a52-7d1c-4a63-bb0e-1d2c3b4a5f60", "correlation_id": "corr-9f8e7d6c"}
START = {"type": "StartPayment", "message_id": "a3c1e0f2-58b4-5c7d-9e0f-123456789abc", "correlation_id": None}
CAPTURE = {"type": "CapturePayment", "message_id": "c0ffee00-58b4-5c7d-9e0f-123456789abc", "correlation_id": None}
CANCEL = {"type": "CancelOrder", "message_id": "b9d8c7e6-f5a4-4b3c-8d2e-1f0a9b8c7d6e", "correlation_id": "corr-cancel"}
INTENT = "pi_3PqRsTuVwXyZ0123456789ab"
KEY = f"order-{ORDER}-start"
ERROR = "stripe: 402 card_declined: Your card was declined (decline_code generic_decline)"


def payment(at: str, status: str, cause: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "at": at,
        "provider": "stripe",
        "status": status,
        "amount": 1250,
        "currency": "EUR",
        "idempotency_key": KEY,
        "provider_payment_id": INTENT,
        "capture_id": extra.get("capture_id"),
        "refund_id": extra.get("refund_id"),
        "confirmed_event_id": None,
        "attempts": 1,
        "last_error": extra.get("last_error"),
        "caused_by": cause,
    }


STORY: dict[str, Any] = {
    "order": {
        "order_id": ORDER,
        "user_id": "user-4711",
        "status": "awaiting_payment",
        "total": "12.50",
        "currency": "EUR",
        "shipment": None,
    },
    "transitions": [
        {
            "at": "2026-01-02T12:00:00.123456+00:00",
            "from_status": None,
            "to_status": "pending",
            "reason": None,
            "command": PLACE,
        },
        {
            "at": "2026-01-02T12:00:01.654321+00:00",
            "from_status": "pending",
            "to_status": "awaiting_payment",
            "reason": "the buyer must confirm the payment (3-D Secure)",
            "command": START,
        },
    ],
    "events": [
        {
            "at": "2026-01-02T12:00:00.123456+00:00",
            "event_id": "e1d2c3b4-a596-4788-9a0b-c1d2e3f4a5b6",
            "exchange": "orders.events",
            "routing_key": "payment.start",
            "relayed": True,
            "caused_by": PLACE,
        },
        {
            "at": "2026-01-02T12:00:01.654321+00:00",
            "event_id": "f1e2d3c4-b5a6-4978-8a9b-0c1d2e3f4a5b",
            "exchange": "orders.events",
            "routing_key": "order.awaiting_payment",
            "relayed": False,
            "caused_by": START,
        },
    ],
    "payments": [
        payment("2026-01-02T12:00:01.654321+00:00", "requires_action", START),
        payment("2026-01-02T12:05:07.000001+00:00", "succeeded", CAPTURE, capture_id="ch_3PqRsTuVwXyZ01234567"),
        payment("2026-01-02T12:06:00.5+00:00", "declined", CAPTURE, last_error=ERROR),
    ],
    "refusals": [
        {
            "at": "2026-01-02T12:07:00+00:00",
            "reason": "illegal_transition",
            "message": "an order awaiting payment cannot be shipped",
            "caused_by": CANCEL,
        }
    ],
    "dead_letters": [
        {
            "message_id": "d0d0d0d0-1111-4222-8333-444455556666",
            "type": "PaymentConfirmed",
            "queue": "orders.payment-confirmed",
            "error_class": "PermanentPaymentError",
            "reason": "stripe: the PaymentIntent belongs to another account",
            "attempts": 3,
        }
    ],
}

#: what the default (narrow) tables must show whole
NARROW = [
    "2026-01-02 12:00:00",
    "∅ → pending",
    "pending → awaiting_payment",
    "PlaceOrder",
    "StartPayment",
    "payment.start",
    "order.awaiting_payment",
    "pending",
    "requires_action",
    "succeeded",
    "declined",
    "stripe",
    INTENT,
    "illegal_transition",
    "d0d0d0d0-1111-4222-8333-444455556666",
    "PaymentConfirmed",
    "PermanentPaymentError",
]
#: what only --wide shows
WIDE_ONLY = [
    KEY,
    ERROR,
    "ch_3PqRsTuVwXyZ01234567",
    PLACE["message_id"],
    "corr-9f8e7d6c",
    "the buyer must confirm the payment (3-D Secure)",
    "e1d2c3b4-a596-4788-9a0b-c1d2e3f4a5b6",
    "an order awaiting payment cannot be shipped",
    "orders.payment-confirmed",
    "stripe: the PaymentIntent belongs to another account",
    "2026-01-02T12:00:00.123456+00:00",
]


def lines(wide: bool) -> list[str]:
    console = Console(width=80, record=True, file=io.StringIO())
    if wide:
        print_whole(console, render(STORY, wide=True))
    else:
        console.print(render(STORY))
    return console.export_text().splitlines()


def test_at_80_columns_no_cell_of_the_default_columns_is_cut() -> None:
    shown = lines(wide=False)
    text = "\n".join(shown)
    assert all(len(line) <= 80 for line in shown), text
    assert "…" not in text, text
    for value in NARROW:
        assert value in text, value
    (header,) = [line for line in shown if "provider id" in line]
    assert header.split() == ["at", "(UTC)", "status", "provider", "provider", "id"]
    rows = [line for line in shown if INTENT in line]
    assert len(rows) == 3 and all(line.split()[-2:] == ["stripe", INTENT] for line in rows)  # one line each


def test_at_80_columns_the_rest_waits_for_wide() -> None:
    text = "\n".join(lines(wide=False))
    for value in WIDE_ONLY:
        assert value not in text, value


def test_wide_shows_every_column_whole_one_line_a_row() -> None:
    shown = lines(wide=True)
    text = "\n".join(shown)
    assert "…" not in text
    for value in [v for v in NARROW if v != "2026-01-02 12:00:00"] + WIDE_ONLY:
        assert value in text, value
    (declined,) = [line for line in shown if ERROR in line]
    assert KEY in declined and INTENT in declined and CAPTURE["message_id"] in declined
    assert max(len(line) for line in shown) > 80  # it runs past the terminal rather than fold
