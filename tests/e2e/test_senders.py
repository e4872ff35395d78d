"""Trust on the bus (issue 20): a command has only the effects its sender is entitled to.

Real RabbitMQ users with real permissions, made by ``orders topology --users``
in a vhost of this module's own: a shop, a fulfilment service, an internal
payment service and a back office, each allowed to publish to
``orders.commands`` only, and the service's own user, which the worker, the
relay and the test's shim-like publishes use.  The worker runs with the
sender map the CLI printed.  The broker vouches for ``user_id``; the worker
gives each sender what the map allows, whatever the body claims.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import pika.exceptions
import pytest
import yaml
from sqlalchemy import text

from scripts import harness
from tests.servers import Provider
from worker.rabbit import users as broker_users

ORDERS = str(Path(sys.executable).parent / "orders")
RUN = os.getpid()
VHOST = f"orders-senders-{RUN}"
PREFIX, SERVICE = f"snd{RUN}-", f"orders-svc-{RUN}"
SHOP, FULFILMENT, PAYMENTS, BACKOFFICE = (f"{PREFIX}{n}" for n in ("shop", "fulfilment", "payments", "backoffice"))
ROLES = (SHOP, FULFILMENT, PAYMENTS, BACKOFFICE)
ROUTES = {"PlaceOrder": "order.place", "CancelOrder": "order.cancel", "PaymentConfirmed": "payment.confirmed"}
ROUTES["ShipOrder"] = "order.ship"
CAPTURE = "test.senders.capture"


class Bus:
    """The module's vhost as each user sees it, an event capture, and the database."""

    def __init__(self, env: dict[str, str], sender_map: dict[str, Any], engine: Any, fakes: Any) -> None:
        self.env, self.sender_map, self.engine, self.fakes = env, sender_map, engine, fakes
        self.port = harness.amqp_port(os.environ["ORDERS_RABBITMQ__URL"])
        self.conns: dict[str, pika.BlockingConnection] = {}
        self.captured: list[dict[str, Any]] = []

    def url(self, user: str) -> str:
        password = "guest" if user == "guest" else self.env[self.password_env(user)]
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{VHOST}"

    def password_env(self, user: str) -> str:
        return "ORDERS_SERVICE_PASSWORD" if user == SERVICE else broker_users.password_env(user)

    def channel(self, user: str) -> Any:
        conn = self.conns.get(user)
        if conn is None or not conn.is_open:
            conn = self.conns[user] = pika.BlockingConnection(pika.URLParameters(self.url(user)))
        ch = conn.channel()
        ch.confirm_delivery()
        return ch

    def send(self, user: str, command: str, body: dict[str, Any], user_id: str | None = "", **props: Any) -> str:
        """Publish ``command`` as ``user`` (``user_id`` the same unless given; None: no user_id at all)."""
        message_id = props.pop("message_id", None) or str(uuid.uuid4())
        self.channel(user).basic_publish(
            "orders.commands",
            ROUTES[command],
            json.dumps(body).encode(),
            pika.BasicProperties(
                message_id=message_id,
                type=command,
                content_type="application/json",
                delivery_mode=2,
                user_id=user if user_id == "" else user_id,
                **props,
            ),
        )
        return message_id

    def events(self) -> list[dict[str, Any]]:
        ch = self.channel("guest")
        while True:
            method, props, body = ch.basic_get(CAPTURE, auto_ack=True)
            if method is None:
                return self.captured
            self.captured.append(
                {"routing_key": method.routing_key, "message_id": props.message_id, **json.loads(body)}
            )

    def refusal(self, message_id: str) -> dict[str, Any] | None:
        found = [e for e in self.events() if e["routing_key"] == "command.refused" and e["message_id"] == message_id]
        return found[0] if found else None

    def of(self, order_id: str) -> list[str]:
        return [e["routing_key"] for e in self.events() if e["order_id"] == order_id]

    def dead_letters(self) -> list[Any]:
        ch = self.channel("guest")
        found, last = [], None
        while True:
            method, props, body = ch.basic_get("orders.dead-letter", auto_ack=False)
            if method is None:
                break
            last = method.delivery_tag
            found.append((props, body))
        if last is not None:
            ch.basic_nack(last, multiple=True, requeue=True)
        return found

    def order(self, order_id: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT o.status, o.user_id, o.total, o.currency, o.payment_provider, p.status AS payment_status,"
                    " p.provider AS paid_by, p.provider_payment_id FROM orders o LEFT JOIN payments p USING (order_id)"
                    " WHERE o.order_id = CAST(:o AS uuid)"
                ),
                {"o": order_id},
            ).first()

    def place(self, provider: str = "stripe", method: str = "pm_card_visa", user: str = "bob") -> str:
        order_id = str(uuid.uuid4())
        body = {
            "order_id": order_id,
            "user_id": user,
            "items": [{"product_id": "sku-apple", "quantity": 2}],
            "payment": Provider(provider, self.fakes[provider]).payment(method),
        }
        self.send(SHOP, "PlaceOrder", body)
        return order_id

    def close(self) -> None:
        for conn in self.conns.values():
            if conn.is_open:
                conn.close()


@pytest.fixture(scope="module")
def users(test_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The module's vhost with its users, made by ``orders topology --users``; removed at the end."""
    if shutil.which("rabbitmqctl") is None or os.environ.get("ORDERS_TEST_RABBITMQCTL"):
        pytest.skip("`orders topology --users` runs the local rabbitmqctl, and the broker is not local")
    harness.create_vhost(VHOST, "guest", fresh=True)
    port = harness.amqp_port(test_env["ORDERS_RABBITMQ__URL"])
    env = {
        **test_env,
        "GUEST_URL": f"amqp://guest:guest@127.0.0.1:{port}/{VHOST}",
        "ORDERS_RABBITMQ__URL": f"amqp://guest:guest@127.0.0.1:{port}/{VHOST}",
        "ORDERS_SERVICE_PASSWORD": secrets.token_urlsafe(18),
        **{broker_users.password_env(user): secrets.token_urlsafe(18) for user in ROLES},
    }
    try:
        done = subprocess.run(
            [ORDERS, "topology", "--users", "--prefix", PREFIX, "--service-user", SERVICE],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        env["SENDER_MAP"] = json.dumps(yaml.safe_load(done.stdout[done.stdout.index("senders:") :])["senders"])
        env["ORDERS_RABBITMQ__URL"] = f"amqp://{SERVICE}:{env['ORDERS_SERVICE_PASSWORD']}@127.0.0.1:{port}/{VHOST}"
        yield env
    finally:
        for user in (*ROLES, SERVICE):
            harness.rabbitmqctl("delete_user", user)
        harness.delete_vhost(VHOST)


@pytest.fixture(scope="module")
def stack(users: dict[str, str], module_service: Any, settings: Any, fakes: Any) -> Iterator[dict[str, Any]]:
    """A worker and a relay as the service user, with the printed sender map (development mode)."""
    env = {"ORDERS_RABBITMQ__URL": users["ORDERS_RABBITMQ__URL"], "ORDERS_SENDERS": users["SENDER_MAP"]}
    done = subprocess.run([ORDERS, "topology"], env={**users, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # declared by the service user: it may
    ch = pika.BlockingConnection(pika.URLParameters(users["GUEST_URL"])).channel()
    ch.queue_declare(CAPTURE, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_bind(CAPTURE, "inventory", routing_key="#")
    ch.queue_bind(CAPTURE, "orders.events", routing_key="#")
    ch.connection.close()
    worker = module_service("worker", "--processes", "1", **env)
    relay = module_service("relay", **env)
    yield {"env": env, "worker": worker, "relay": relay}


@pytest.fixture
def bus(users: dict[str, str], stack: Any, clean_db: Any, fakes: Any) -> Iterator[Bus]:
    for f in fakes.values():
        httpx.post(f.url + "/_fake/reset").raise_for_status()
    b = Bus(users, json.loads(users["SENDER_MAP"]), clean_db, fakes)
    b.events()
    b.captured.clear()
    try:
        yield b
    finally:
        b.close()


def test_the_broker_refuses_a_user_id_that_is_not_the_connections_own(bus):
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        bus.send(SHOP, "CancelOrder", {"order_id": str(uuid.uuid4())}, user_id=BACKOFFICE)
    assert refused.value.reply_code == 406  # PRECONDITION_FAILED: user_id property set to ... but authenticated as


@pytest.mark.parametrize("provider", ["stripe", "paypal"])
def test_a_forged_internal_confirmation_does_not_complete_an_order_that_was_never_paid(bus, wait, provider):
    """The attack of issue 20: ``provider: internal``, the order's amount, and the payment id the buyer is handed
    (Stripe 3-D Secure: the ``pi_…`` of the client secret; PayPal: the ``token`` of ``approve_url``)."""
    method = "pm_card_threeDSecure2Required" if provider == "stripe" else "paypal"
    order_id = bus.place(provider, method)
    wait(lambda: (o := bus.order(order_id)) is not None and o.status == "awaiting_payment")
    placed = bus.order(order_id)
    forged = {
        "order_id": order_id,
        "provider": "internal",
        "payment_id": placed.provider_payment_id,
        "amount": placed.total,
        "currency": placed.currency,
        "event_id": f"evt-forged-{provider}",
    }
    # from the internal payment service, which may confirm internal payments: asked about at the order's provider
    as_payments = bus.send(PAYMENTS, "PaymentConfirmed", forged)
    refusal = wait(lambda: bus.refusal(as_payments), what="the confirmation refused")
    assert refusal["reason"] in ("payment_not_confirmed", "payment_mismatch")
    # from the shop, which may not confirm payments at all: unauthorized, dead-lettered
    as_shop = bus.send(SHOP, "PaymentConfirmed", {**forged, "event_id": f"evt-forged-shop-{provider}"})
    refusal = wait(lambda: bus.refusal(as_shop), what="the shop's confirmation refused")
    assert refusal["reason"] == "unauthorized" and refusal["command"] == "PaymentConfirmed"
    wait(lambda: [p for p, _ in bus.dead_letters() if p.message_id == as_shop], what="the shop's one dead-lettered")
    order = bus.order(order_id)
    assert (order.status, order.payment_status, order.paid_by) == ("awaiting_payment", "requires_action", provider)
    assert "order.completed" not in bus.of(order_id) and "stock.commit" not in bus.of(order_id)


def test_roles_come_from_the_sender_map_not_from_the_body(bus, wait):
    order_id = bus.place("stripe", "pm_card_threeDSecure2Required", user="bob")
    wait(lambda: (o := bus.order(order_id)) is not None and o.status == "awaiting_payment")
    claimed_admin = {"order_id": order_id, "requested_by": {"user_id": "nobody", "roles": ["admin"]}}
    from_shop = bus.send(SHOP, "CancelOrder", claimed_admin)
    refusal = wait(lambda: bus.refusal(from_shop), what="the shop's self-declared admin refused")
    assert refusal["reason"] == "not_found"  # judged as nobody's cancel of bob's order
    assert bus.order(order_id).status == "awaiting_payment"
    bus.send(BACKOFFICE, "CancelOrder", claimed_admin)  # the back office may act as admin
    wait(lambda: bus.order(order_id).status == "cancelled", what="the back office's cancel")
    # the shop may still cancel for the user it names: its own order, as the owner
    mine = bus.place("stripe", "pm_card_threeDSecure2Required", user="carol")
    wait(lambda: (o := bus.order(mine)) is not None and o.status == "awaiting_payment")
    bus.send(SHOP, "CancelOrder", {"order_id": mine, "requested_by": {"user_id": "carol", "roles": ["user"]}})
    wait(lambda: bus.order(mine).status == "cancelled", what="the owner's cancel through the shop")


def test_only_the_fulfilment_service_ships(bus, wait):
    order_id = bus.place()
    wait(lambda: (o := bus.order(order_id)) is not None and o.status == "completed")
    ship = {"order_id": order_id, "shipment": {"carrier": "DHL", "tracking_number": "JD0001"}}
    from_shop = bus.send(SHOP, "ShipOrder", ship)
    refusal = wait(lambda: bus.refusal(from_shop), what="the shop's ShipOrder refused")
    assert refusal["reason"] == "unauthorized"
    letters = wait(lambda: [(p, b) for p, b in bus.dead_letters() if p.message_id == from_shop])
    headers = letters[0][0].headers
    assert headers["x-error-class"] == "Unauthorized" and headers["x-orders-sender"] == SHOP
    assert letters[0][0].user_id == SERVICE  # republished by the service, which vouches for the first sender
    assert bus.order(order_id).status == "completed"
    bus.send(FULFILMENT, "ShipOrder", ship)
    wait(lambda: bus.order(order_id).status == "shipped", what="shipped by fulfilment")


def test_a_retried_command_is_still_judged_as_its_first_sender(bus, wait):
    """A cancel that arrives before its order goes through the delay tiers, republished by the service's own user:
    if the retry lost its sender it would come back with the service's rights and cancel as an admin."""
    order_id = str(uuid.uuid4())
    early = bus.send(
        SHOP, "CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "mallory", "roles": ["admin"]}}
    )
    body = {
        "order_id": order_id,
        "user_id": "bob",
        "items": [{"product_id": "sku-apple", "quantity": 1}],
        "payment": Provider("stripe", bus.fakes["stripe"]).payment("pm_card_threeDSecure2Required"),
    }
    bus.send(SHOP, "PlaceOrder", body)
    refusal = wait(lambda: bus.refusal(early), timeout=30, what="the retried cancel refused")
    assert refusal["reason"] == "not_found"
    wait(lambda: bus.order(order_id).status == "awaiting_payment", what="not cancelled: waits for its buyer")


def test_a_replayed_dead_letter_is_judged_as_its_first_sender(bus, wait, users):
    order_id = bus.place()
    wait(lambda: (o := bus.order(order_id)) is not None and o.status == "completed")
    from_shop = bus.send(
        SHOP, "ShipOrder", {"order_id": order_id, "shipment": {"carrier": "DHL", "tracking_number": "X1"}}
    )
    wait(lambda: [p for p, _ in bus.dead_letters() if p.message_id == from_shop], what="dead-lettered")
    env = {**users, "ORDERS_SENDERS": users["SENDER_MAP"]}
    done = subprocess.run(
        [ORDERS, "dlq", "replay", from_shop, "--actor", "ops"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # replayed by the operator (the service user): judged as the shop again, so dead-lettered again, not shipped
    wait(
        lambda: [
            p for p, _ in bus.dead_letters() if p.message_id == from_shop and (p.headers or {}).get("x-replay-count")
        ],
        what="dead-lettered again after the replay",
    )
    assert bus.order(order_id).status == "completed"


def test_replies_go_only_to_reply_queues(bus, wait, stack):
    conn = pika.BlockingConnection(pika.URLParameters(bus.url(SHOP)))
    try:
        ch = conn.channel()
        answers: list[bytes] = []
        ch.basic_consume("amq.rabbitmq.reply-to", lambda _c, _m, _p, b: answers.append(b), auto_ack=True)
        first = str(uuid.uuid4())
        body = {
            "order_id": first,
            "user_id": "bob",
            "items": [{"product_id": "sku-apple", "quantity": 1}],
            "payment": Provider("stripe", bus.fakes["stripe"]).payment("pm_card_visa"),
        }
        ch.basic_publish(
            "orders.commands",
            "order.place",
            json.dumps(body).encode(),
            pika.BasicProperties(
                message_id=str(uuid.uuid4()), type="PlaceOrder", user_id=SHOP, reply_to="amq.rabbitmq.reply-to"
            ),
        )
        deadline = time.monotonic() + 20
        while not answers and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
        assert answers and json.loads(answers[0])["order_id"] == first
    finally:
        conn.close()
    # the attack: a reply into the dead-letter queue, which the shop may not write to itself
    second = str(uuid.uuid4())
    bus.send(
        SHOP,
        "PlaceOrder",
        {**body, "order_id": second},
        reply_to="orders.dead-letter",
        correlation_id="looks-like-a-dead-letter",
    )
    wait(lambda: (o := bus.order(second)) is not None and o.status == "completed", what="still applied")
    assert [p for p, _ in bus.dead_letters() if p.correlation_id == "looks-like-a-dead-letter"] == []
    wait(lambda: "reply_to is not a reply queue" in stack["worker"].tail(), what="logged")
