"""Message models are strict and name the field; settings name the key."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from schema.messages import InvalidMessage
from schema.topology import parse_command
from worker.settings import SettingsError, load_settings

CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
STRIPE = {"provider": "stripe", "payment_method": "pm_card_visa"}


def parse(kind: str, body: object) -> object:
    return parse_command(kind, json.dumps(body).encode())


def test_place_order_accepts_both_item_forms_and_derives_a_stable_order_id():
    single = parse("PlaceOrder", {"user_id": "u", "product_id": "sku-1", "quantity": 2, "payment": STRIPE})
    listed = parse("PlaceOrder", {"user_id": "u", "items": [{"product_id": "sku-1", "quantity": 2}], "payment": STRIPE})
    assert single.lines() == listed.lines()
    assert single.resolved_order_id("m-1") == single.resolved_order_id("m-1") != single.resolved_order_id("m-2")
    uuid.UUID(single.resolved_order_id("m-1"))


@pytest.mark.parametrize(
    "body, field",
    [
        ({"user_id": "u", "items": [], "payment": STRIPE}, "items"),
        ({"user_id": "u", "items": [{"product_id": "a", "quantity": 0}], "payment": STRIPE}, "items.0.quantity"),
        ({"user_id": "u", "items": [{"product_id": "a", "quantity": -3}], "payment": STRIPE}, "items.0.quantity"),
        ({"user_id": "u", "items": [{"product_id": "a", "quantity": "2"}], "payment": STRIPE}, "items.0.quantity"),
        ({"user_id": "u", "items": [{"product_id": "a", "quantity": 1}], "payment": STRIPE, "price": 1}, "price"),
        ({"user_id": "x" * 201, "items": [{"product_id": "a", "quantity": 1}], "payment": STRIPE}, "user_id"),
        (
            {"user_id": "u", "items": [{"product_id": "a'; DROP TABLE orders;--", "quantity": 1}], "payment": STRIPE},
            "product_id",
        ),
        (
            {"user_id": "u", "items": [{"product_id": "a", "quantity": 1}], "payment": {"provider": "bitcoin"}},
            "payment",
        ),
        (
            {
                "user_id": "u",
                "items": [{"product_id": "a", "quantity": 1}],
                "payment": {"provider": "paypal", "return_url": "javascript:alert(1)", "cancel_url": "https://x/c"},
            },
            "return_url",
        ),
        (
            {
                "order_id": "not-a-uuid",
                "user_id": "u",
                "items": [{"product_id": "a", "quantity": 1}],
                "payment": STRIPE,
            },
            "order_id",
        ),
    ],
)
def test_bad_place_orders_are_rejected_naming_the_field(body, field):
    with pytest.raises(InvalidMessage, match=field.replace(".", r"\.")):
        parse("PlaceOrder", body)


def test_payment_confirmed_wants_integer_minor_units():
    body = {
        "order_id": str(uuid.uuid4()),
        "provider": "stripe",
        "payment_id": "pi",
        "amount": 10.5,
        "currency": "USD",
        "event_id": "evt",
    }
    with pytest.raises(InvalidMessage, match="amount"):
        parse("PaymentConfirmed", body)
    with pytest.raises(InvalidMessage, match="currency"):
        parse("PaymentConfirmed", {**body, "amount": 10, "currency": "usd"})


def test_environment_overrides_the_file():
    s = load_settings(CONFIG, {"ORDERS_DATABASE__HOST": "db.internal", "ORDERS_WORKER__RETRY_DELAYS_SECONDS": "[2, 4]"})
    assert s.database.host == "db.internal"
    assert s.worker.retry_delays_seconds == (2, 4)


def test_a_malformed_or_missing_setting_names_the_key(tmp_path):
    with pytest.raises(SettingsError, match=r"database\.port \(ORDERS_DATABASE__PORT\)"):
        load_settings(CONFIG, {"ORDERS_DATABASE__PORT": "five"})
    broken = tmp_path / "c.yaml"
    broken.write_text(CONFIG.read_text().replace("  dbname: ecommerce_orders\n", ""))
    with pytest.raises(SettingsError, match=r"database\.dbname"):
        load_settings(broken, {})
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.yaml", {})


def test_secrets_are_masked_in_the_settings_repr():
    s = load_settings(CONFIG, {"ORDERS_STRIPE__API_KEY": "sk_live_very_secret"})
    assert "sk_live_very_secret" not in repr(s)


def test_the_fast_uuid5_is_the_standard_one():
    from schema.messages import ORDER_ID_NAMESPACE, uuid5

    for name in ("m-1", "x" * 300, "ünïcode"):
        assert uuid5(ORDER_ID_NAMESPACE, name) == str(uuid.uuid5(ORDER_ID_NAMESPACE, name))


def test_each_queue_takes_exactly_the_commands_its_consumer_applies():
    """The queue → command map in schema.topology is the one the consumers and the routing agree with."""
    from handlers import COMMAND_HANDLERS
    from handlers.payment_commands import payment_handlers
    from schema.topology import COMMAND_QUEUES, PAYMENTS_QUEUE, QUEUE_ACCEPTS

    assert set(QUEUE_ACCEPTS) == {*COMMAND_QUEUES, PAYMENTS_QUEUE}
    assert {t for q in COMMAND_QUEUES for t in QUEUE_ACCEPTS[q]} == {c.__name__ for c in COMMAND_HANDLERS}
    assert QUEUE_ACCEPTS[PAYMENTS_QUEUE] == {c.__name__ for c in payment_handlers()}


def test_a_command_on_another_commands_queue_is_an_invalid_message():
    from worker.commands import decode
    from worker.rabbit.connection import Delivery

    body = json.dumps(
        {
            "order_id": str(uuid.uuid4()),
            "user_id": "u1",
            "items": [{"product_id": "p", "quantity": 1}],
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
        }
    ).encode()

    def on(queue: str) -> Delivery:
        return Delivery(
            1,
            "orders.commands",
            "order.cancel",
            queue,
            body,
            "m-1",
            "PlaceOrder",
            None,
            None,
            "application/json",
            {},
            False,
        )

    assert decode(on("orders.place")).user_id == "u1"
    for queue in ("orders.cancel", "orders.payment-confirmed", "orders.payments", ""):
        with pytest.raises(InvalidMessage, match="does not belong on queue"):
            decode(on(queue))
