"""Senders (handlers/senders.py), their identity across republishes (worker/identity.py), the ``senders`` setting
and where replies may go: the rules of issue 20 as tables, no server."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from handlers.errors import Unauthorized
from handlers.senders import SenderMap
from schema.messages import CancelOrder, PaymentConfirmed, PlaceOrder, ShipOrder
from tests.support import place_body
from worker.identity import SENDER_HEADER, Identities, sender_map
from worker.rabbit.connection import Delivery
from worker.settings import SettingsError, load_settings
from worker.settlement import reply_queue

SERVICE = "orders-service"
MAP = SenderMap.of(
    {
        "shop": (("PlaceOrder", "CancelOrder"), False, ()),
        "fulfilment": (("ShipOrder",), False, ()),
        "payments": (("PaymentConfirmed",), False, ("internal",)),
        "backoffice": (("CancelOrder",), True, ()),
    },
    SERVICE,
    open_=False,
)
ORDER = str(uuid.uuid4())


def confirmation(provider: str) -> PaymentConfirmed:
    return PaymentConfirmed.model_validate_json(
        json.dumps(
            {
                "order_id": ORDER,
                "provider": provider,
                "payment_id": "p",
                "amount": 1,
                "currency": "USD",
                "event_id": "e",
            }
        )
    )


COMMANDS: dict[str, Any] = {
    "place": PlaceOrder.model_validate_json(json.dumps(place_body())),
    "cancel": CancelOrder.model_validate_json(
        json.dumps({"order_id": ORDER, "requested_by": {"user_id": "u", "roles": ["admin"]}})
    ),
    "ship": ShipOrder.model_validate_json(
        json.dumps({"order_id": ORDER, "shipment": {"carrier": "c", "tracking_number": "t"}})
    ),
    "internal": confirmation("internal"),
    "stripe": confirmation("stripe"),
    "paypal": confirmation("paypal"),
}


@pytest.mark.parametrize(
    ("user", "allowed"),
    [
        ("shop", {"place", "cancel"}),
        ("fulfilment", {"ship"}),
        ("payments", {"internal"}),  # never stripe or paypal: only the service's webhook endpoint vouches for those
        ("backoffice", {"cancel"}),
        (SERVICE, set(COMMANDS)),
        ("stranger", set()),
        (None, set()),
    ],
)
def test_each_sender_may_send_what_the_map_gives_it_and_nothing_else(user, allowed):
    sender = MAP.sender(user)
    for name, command in COMMANDS.items():
        if name in allowed:
            sender.check(command)
        else:
            with pytest.raises(Unauthorized):
                sender.check(command)


def test_only_the_back_office_and_the_service_may_act_as_admin():
    assert [u for u in ("shop", "fulfilment", "payments", "backoffice", SERVICE, None) if MAP.sender(u).admin] == [
        "backoffice",
        SERVICE,
    ]


def delivery(user_id: str | None, **headers: Any) -> Delivery:
    return Delivery(
        1,
        "orders.commands",
        "order.place",
        "orders.place",
        b"{}",
        "m",
        "PlaceOrder",
        None,
        None,
        None,
        headers,
        False,
        user_id=user_id,
    )


@pytest.mark.parametrize(
    ("user_id", "headers", "first_sender"),
    [
        ("shop", {}, "shop"),
        ("shop", {SENDER_HEADER: "backoffice"}, "shop"),  # a header set by anyone but the service is not believed
        (SERVICE, {SENDER_HEADER: "backoffice"}, "backoffice"),  # the service's own republish
        (SERVICE, {SENDER_HEADER: b"fulfilment"}, "fulfilment"),  # as pika hands a long string over
        (SERVICE, {SENDER_HEADER: ""}, None),  # a command that named no sender stays without one
        (SERVICE, {}, SERVICE),  # the shim's own command
        (None, {SENDER_HEADER: "backoffice"}, None),
    ],
)
def test_the_first_sender_is_believed_from_the_header_only_on_the_services_own_publishes(
    user_id, headers, first_sender
):
    assert Identities(MAP).user_of(delivery(user_id, **headers)) == first_sender


def test_a_republish_is_the_services_own_and_carries_the_first_sender():
    identities = Identities(MAP)
    carried = identities.carry(delivery("shop"), {"message_id": "m", "headers": {"x-attempts": 1}})
    assert carried["user_id"] == SERVICE and carried["headers"] == {"x-attempts": 1, SENDER_HEADER: "shop"}
    again = identities.carry(delivery(SERVICE, **carried["headers"]), carried)  # a retry of the retry
    assert again["headers"][SENDER_HEADER] == "shop"
    anonymous = identities.carry(delivery(None), {"headers": {}})
    assert anonymous["headers"][SENDER_HEADER] == ""


def test_development_without_a_map_is_open_and_production_without_one_trusts_only_the_service():
    dev = sender_map(load_settings(environ={"ORDERS_ENVIRONMENT": "development"}))
    prod = sender_map(load_settings(environ={"ORDERS_ENVIRONMENT": "production"}))
    assert dev.open and dev.sender(None).admin and dev.sender("anyone").commands
    assert not prod.open and not prod.sender(None).commands and not prod.sender("anyone").commands
    assert prod.sender("guest").admin  # config/config.yaml's broker user is the service's own
    mapped = sender_map(
        load_settings(
            environ={
                "ORDERS_ENVIRONMENT": "development",
                "ORDERS_SENDERS": json.dumps({"shop": {"commands": ["PlaceOrder"]}}),
            }
        )
    )
    assert not mapped.open and not mapped.sender("stranger").commands  # a map is enforced in development too


def test_the_service_user_comes_from_the_url_percent_decoded():
    settings = load_settings(environ={"ORDERS_RABBITMQ__URL": "amqp://orders%2Dsvc:pw@mq:5672/shop"})
    assert settings.rabbitmq.user == "orders-svc"


@pytest.mark.parametrize(
    ("senders", "says"),
    [
        ({"shop": {"commands": ["PlaceOrder"], "admin": True}}, "list CancelOrder"),
        ({"shop": {"commands": ["Refund"]}}, "unknown command"),
        ({"pay": {"commands": ["PaymentConfirmed"]}}, "providers"),
        ({"pay": {"commands": ["PaymentConfirmed"], "providers": ["stripe"]}}, "internal"),
        ({"shop": {"commands": []}}, "commands"),
        ({"guest": {"commands": ["PlaceOrder"]}}, "service's own broker user"),
    ],
)
def test_a_sender_map_that_makes_no_sense_is_refused_naming_the_entry(senders, says):
    with pytest.raises(SettingsError, match=says):
        load_settings(environ={"ORDERS_SENDERS": json.dumps(senders)})


@pytest.mark.parametrize(
    ("reply_to", "ok"),
    [
        ("amq.rabbitmq.reply-to", True),
        ("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNjk5NjM3MwAAA", True),
        ("amq.gen-JzTY20BRgKO-HjmUJj0wLg", True),
        ("orders.dead-letter", False),
        ("orders.place", False),
        ("", False),
        ("my-reply-queue", False),
    ],
)
def test_replies_go_only_to_direct_reply_to_and_server_named_queues(reply_to, ok):
    assert reply_queue(reply_to) is ok
