"""``orders topology --users``: the broker enforces the trust boundary of docs/security.md.

Real RabbitMQ, real users made with rabbitmqctl, in a vhost of this module's
own; the users and the vhost are removed at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import yaml

from scripts import harness
from worker.rabbit import users as broker_users
from worker.rabbit.connection import BlockingBroker, Outgoing
from worker.rabbit.dead_letters import DeadLetterSession

ORDERS = str(Path(sys.executable).parent / "orders")
RUN = os.getpid()
VHOST = f"orders-users-test-{RUN}"
PREFIX, SERVICE = f"orders-{RUN}-", f"orders-service-{RUN}"
UPSTREAM = f"{PREFIX}shop"
#: the default senders ``--users --prefix`` makes
SENDERS = [f"{PREFIX}{name}" for name in ("shop", "fulfilment", "payments", "backoffice")]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return harness.rabbitmqctl(*args)


def url(user: str, password: str) -> str:
    return f"amqp://{user}:{password}@127.0.0.1:{harness.amqp_port(os.environ['ORDERS_RABBITMQ__URL'])}/{VHOST}"


def orders(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ORDERS, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def users_env(test_env: dict[str, str]) -> Iterator[dict[str, str]]:
    if shutil.which("rabbitmqctl") is None or os.environ.get("ORDERS_TEST_RABBITMQCTL"):
        pytest.skip("`orders topology --users` runs the local rabbitmqctl, and the broker is not local")
    harness.rabbitmqctl("add_vhost", VHOST, check=True)
    env = {
        **test_env,
        "ORDERS_RABBITMQ__URL": url("guest", "guest"),
        "ORDERS_SERVICE_PASSWORD": secrets.token_urlsafe(18),
        **{broker_users.password_env(user): secrets.token_urlsafe(18) for user in SENDERS},
    }
    try:
        yield env
    finally:
        for user in (*SENDERS, SERVICE):
            ctl("delete_user", user)
        ctl("delete_vhost", VHOST)


def connect(user: str, password: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url(user, password)))


def confirming(conn: pika.BlockingConnection) -> Any:
    """A channel with publisher confirms: a publish waits for the broker's answer."""
    channel = conn.channel()
    channel.confirm_delivery()
    return channel


def refused(action: Any) -> int:
    """The reply code with which the broker closed the channel for ``action`` (403: ACCESS_REFUSED)."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
        action()
    return caught.value.reply_code


def place_order() -> tuple[bytes, pika.BasicProperties]:
    body = {
        "order_id": str(uuid.uuid4()),
        "user_id": "u1",
        "items": [{"product_id": "sku-apple", "quantity": 1}],
        "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
    }
    return json.dumps(body).encode(), pika.BasicProperties(
        message_id=str(uuid.uuid4()), type="PlaceOrder", content_type="application/json", delivery_mode=2
    )


def test_a_sender_user_may_only_publish_commands_and_the_service_user_only_its_own(users_env):
    args = ("topology", "--users", "--prefix", PREFIX, "--service-user", SERVICE)
    printed = orders(users_env, *args, "--print")  # the recipe for a remote cluster: nothing is run
    assert printed.returncode == 0 and f"'set_permissions' '-p' '{VHOST}' '{SERVICE}'" in printed.stdout
    assert SERVICE not in ctl("list_users", "-q").stdout
    ran = subprocess.run(["sh"], input=printed.stdout, env=users_env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr  # the printed recipe creates the users
    connect(SERVICE, users_env["ORDERS_SERVICE_PASSWORD"]).close()
    # run by the CLI on users that exist: updated, the new password works and the old one no longer does
    old = users_env["ORDERS_SERVICE_PASSWORD"]
    users_env["ORDERS_SERVICE_PASSWORD"] = secrets.token_urlsafe(18)
    done = orders(users_env, *args)
    assert done.returncode == 0, done.stderr
    for name, password in users_env.items():
        if name.startswith(("ORDERS_PASSWORD_", "ORDERS_SERVICE_PASSWORD")):
            assert password not in done.stdout + done.stderr
    # the sender map it prints is the setting that gives each of those users its commands
    printed_map = yaml.safe_load(done.stdout[done.stdout.index("senders:") :])["senders"]
    assert printed_map[UPSTREAM] == {"commands": ["PlaceOrder", "CancelOrder"]}
    assert printed_map[f"{PREFIX}backoffice"] == {"commands": ["CancelOrder"], "admin": True}
    assert set(printed_map) == set(SENDERS)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect(SERVICE, old)
    up_pw, svc_pw = users_env[broker_users.password_env(UPSTREAM)], users_env["ORDERS_SERVICE_PASSWORD"]
    service_url = url(SERVICE, svc_pw)

    # the service user declares the whole topology (delay tiers included)
    done = orders({**users_env, "ORDERS_RABBITMQ__URL": service_url}, "topology")
    assert done.returncode == 0 and "topology declared" in done.stdout, done.stderr

    # upstream: a confirmed PlaceOrder on orders.commands; nothing internal, no consuming, no declaring
    upstream = connect(UPSTREAM, up_pw)
    try:
        body, props = place_order()
        confirming(upstream).basic_publish(
            "orders.commands", "order.place", body, props, mandatory=True
        )  # raises unless confirmed
        refund = json.dumps({"order_id": str(uuid.uuid4())}).encode()
        assert (
            refused(
                lambda: confirming(upstream).basic_publish(
                    "orders.internal", "payment.refund", refund, pika.BasicProperties(type="RefundPayment")
                )
            )
            == 403
        )
        assert refused(lambda: upstream.channel().basic_consume("orders.place", lambda *a: None)) == 403
        assert refused(lambda: upstream.channel().queue_declare("upstream.own-queue")) == 403
    finally:
        upstream.close()

    # the service: consumes the command and answers through direct reply-to, as the shim and a worker do
    shim, worker = connect(SERVICE, svc_pw), BlockingBroker(service_url).connect()
    try:
        answers: list[bytes] = []
        shim_channel = shim.channel()
        shim_channel.basic_consume("amq.rabbitmq.reply-to", lambda _c, _m, _p, b: answers.append(b), auto_ack=True)
        shim_channel.basic_publish(
            "orders.commands",
            "order.place",
            body,
            pika.BasicProperties(message_id="with-reply", type="PlaceOrder", reply_to="amq.rabbitmq.reply-to"),
        )
        worker.consume(["orders.place"], prefetch=10)
        got = []
        while len(got) < 2:
            got += worker.poll(10, first_wait=2, fill_wait=0.1)
        assert [d.message_type for d in got] == ["PlaceOrder", "PlaceOrder"] and got[0].body == body
        worker.publish(Outgoing("", got[1].reply_to or "", b'{"result": "applied"}', {"delivery_mode": 1}))
        worker.publish(Outgoing("orders.delay", "orders.place", body, {"headers": {"orders-delay-tier": "1s"}}))
        worker.publish(Outgoing("orders.dlx", "orders.place", body))
        worker.publish(Outgoing("orders.events", "order.placed", b"{}"))
        worker.ack_through(got[-1].delivery_tag)
        while not answers:
            shim.process_data_events(time_limit=0.2)
        assert answers == [b'{"result": "applied"}']
        assert refused(lambda: shim.channel().queue_declare("service.not-its-own")) == 403
        assert refused(lambda: confirming(shim).basic_publish("amq.topic", "x", b"{}")) == 403
    finally:
        shim.close()
        worker.close()
    # the dead-letter tools: the session lock (an exclusive queue) and the dead-letter queue itself
    session = DeadLetterSession(service_url)
    try:
        assert session.open() == 1  # the dead letter published above
    finally:
        session.close()
