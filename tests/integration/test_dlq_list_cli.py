"""``orders dlq list`` in an 80-column terminal: one line per letter; ``--wide`` for the rest."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pika

ORDERS = str(Path(sys.executable).parent / "orders")
ERROR = "body.items.0.quantity: Input should be greater than 0; body.user_id: Field required (and so on)"


def _dead_letter(bus: Any, message_type: str, queue: str) -> str:
    message_id = str(uuid.uuid4())
    headers = {
        "x-original-exchange": "orders.commands",
        "x-original-routing-key": "order.place",
        "x-original-queue": queue,
        "x-first-failure-at": "2025-01-01T00:00:00+00:00",
        "x-last-failure-at": "2025-01-01T00:00:03+00:00",
        "x-attempts": 3,
        "x-error-class": "InvalidMessage",
        "x-error-message": ERROR,
    }
    props = pika.BasicProperties(message_id=message_id, type=message_type, delivery_mode=2, headers=headers)
    bus.ch.basic_publish("orders.dlx", queue, b"{}", props)
    return message_id


def _list(env: dict[str, str], *args: str) -> list[str]:
    done = subprocess.run(
        [ORDERS, "dlq", "list", *args], env={**env, "COLUMNS": "80"}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_dlq_list_fits_80_columns_and_wide_shows_the_rest(bus: Any, test_env: dict[str, str], wait: Any) -> None:
    ids = [
        _dead_letter(bus, "PlaceOrder", "orders.place"),
        _dead_letter(bus, "PaymentConfirmed", "orders.payment-confirmed"),
    ]
    wait(lambda: bus.depth("orders.dead-letter") == 2, timeout=10, what="the dead letters to land")

    lines = _list(test_env)
    assert len(lines) == 3 + 2, "\n".join(lines)  # title, header, rule, one line per letter
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    for message_id in ids:
        (row,) = [line for line in lines if line.startswith(message_id + " ")]
        assert "InvalidMess" in row and ERROR not in row

    wide = _list(test_env, "--wide")
    assert len(wide) == 3 + 2, "\n".join(wide)
    assert "original queue" in wide[1]
    (row,) = [line for line in wide if line.startswith(ids[1] + " ")]
    assert "PaymentConfirmed" in row and "orders.payment-confirmed" in row and f"InvalidMessage: {ERROR}" in row
