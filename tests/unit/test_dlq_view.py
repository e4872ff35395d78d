"""``dlq list``'s table: one line per dead letter at 80 columns, everything with ``--wide``."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta

from rich.console import Console

from worker.dlq.letters import DeadLetter
from worker.dlq.view import print_letters
from worker.rabbit.connection import Delivery

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
LONG_ERROR = "body.items.0.quantity: Input should be greater than 0; body.user_id: Field required; and more"


def _letter(message_type: str, queue: str, error_class: str, message: str, landed_ago: timedelta) -> DeadLetter:
    headers = {
        "x-error-class": error_class,
        "x-error-message": message,
        "x-attempts": 3,
        "x-original-exchange": "orders.commands",
        "x-original-routing-key": "order.place",
        "x-original-queue": queue,
        "x-first-failure-at": (NOW - landed_ago - timedelta(seconds=7)).isoformat(),
        "x-last-failure-at": (NOW - landed_ago).isoformat(),
    }
    delivery = Delivery(
        1, "", "orders.dead-letter", "orders.dead-letter", b"{}", str(uuid.uuid4()), message_type,
        None, None, "application/json", headers, False,
    )  # fmt: skip
    return DeadLetter.from_delivery(delivery)


LETTERS = [
    _letter("PlaceOrder", "orders.place", "InvalidMessage", LONG_ERROR, timedelta(seconds=40)),
    _letter("PaymentConfirmed", "orders.payment-confirmed", "PaymentProviderError", "stripe: 500\nthrice", timedelta(hours=3)),
    _letter("CancelOrder", "orders.cancel", "DeliveryLimitExceeded", "x", timedelta(days=2)),
]  # fmt: skip


def _render(width: int, wide: bool) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    print_letters(console, LETTERS, "3 dead letter(s)", wide=wide, now=NOW)
    return console.export_text().splitlines()


def _row(lines: list[str], letter: DeadLetter) -> str:
    rows = [line for line in lines if letter.id in line]
    assert len(rows) == 1, lines
    return rows[0]


def test_each_letter_is_one_line_of_at_most_80_columns_with_its_whole_id() -> None:
    lines = _render(80, wide=False)
    assert len(lines) == 3 + len(LETTERS), "\n".join(lines)  # title, header, rule, one line per letter
    assert all(len(line.rstrip()) <= 80 for line in lines), "\n".join(lines)
    for letter in LETTERS:
        row = _row(lines, letter)
        assert row.startswith(letter.id + " ")
    for letter in LETTERS[:2]:
        assert _row(lines, letter).rstrip().endswith("…")  # cut to fit, not wrapped
    assert (
        " 40s " in _row(lines, LETTERS[0]) and " 3h " in _row(lines, LETTERS[1]) and " 2d " in _row(lines, LETTERS[2])
    )


def test_a_wider_terminal_shows_more_of_the_error() -> None:
    lines = _render(140, wide=False)
    assert len(lines) == 3 + len(LETTERS)
    row = _row(lines, LETTERS[0])
    assert "InvalidMessage: body.items.0.quantity: Input should" in row
    assert "PaymentConfirmed" in _row(lines, LETTERS[1])


def test_wide_shows_every_column_whole_on_one_line_even_at_80_columns() -> None:
    lines = _render(80, wide=True)
    assert len(lines) == 3 + len(LETTERS), "\n".join(lines)
    assert all(h in lines[1] for h in ("original queue", "first failure", "last failure", "error"))
    first = _row(lines, LETTERS[0])
    assert f"InvalidMessage: {LONG_ERROR}" in first
    assert "orders.place" in first and "2026-01-02 11:59:13" in first and "2026-01-02 11:59:20" in first
    second = _row(lines, LETTERS[1])
    assert "PaymentConfirmed" in second and "orders.payment-confirmed" in second
    assert "PaymentProviderError: stripe: 500 thrice" in second  # a newline in a message does not break the row
