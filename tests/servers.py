"""The server fixtures (a pytest plugin, registered by ``tests/conftest.py``): real
PostgreSQL, RabbitMQ and Redis, never mocked, the payment fakes, and the
service's processes.  Unit tests may not use them (``tests/conftest.py`` fails
one that does); integration and end-to-end tests do.

Each run uses its own database (``orders_test_<pid>``) and RabbitMQ vhost
(``orders-test-<pid>``, created with rabbitmqctl when it is at hand; else ``/``),
so a service running on the same machine is not disturbed.  Processes
(worker pool, relay) are started as subprocesses through the real CLI, by
the harness (``scripts/harness.py``), which kills them when the run ends.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from sqlalchemy import text

from scripts import harness
from scripts.harness import Proc, RedisServer
from scripts.tcp_proxy import TcpProxy

#: each test run gets its own database and vhost, so runs side by side (and a
#: service running on the same machine) never see each other's messages
RUN_ID = os.environ.get("ORDERS_TEST_RUN_ID", str(os.getpid()))
VHOST = f"orders-test-{RUN_ID}"
TEST_DB = f"orders_test_{RUN_ID}"

PRODUCTS = [
    {"product_id": "sku-apple", "name": "Apple", "price": 150, "currency": "USD", "active": True},
    {"product_id": "sku-pear", "name": "Pear", "price": 275, "currency": "USD", "active": True},
    {"product_id": "sku-euro", "name": "Croissant", "price": 190, "currency": "EUR", "active": True},
    {"product_id": "sku-gone", "name": "Discontinued", "price": 999, "currency": "USD", "active": False},
]


@pytest.fixture(scope="session")
def fakes() -> Iterator[dict[str, Any]]:
    """The Stripe and PayPal fakes, serving real HTTP on loopback for the whole run."""
    from scripts.fakes import fake_paypal, fake_stripe

    servers = {"stripe": fake_stripe.serve(0), "paypal": fake_paypal.serve(0)}
    yield servers
    for server in servers.values():
        server.stop()


class Provider:
    """One payment fake as the tests use it: the ``provider`` fixture gives Stripe's, then PayPal's.

    What differs between the two is said here once: how a gateway is made
    against the fake, what a payment request and a PlaceOrder's payment look
    like, what a start answers when it goes well, where a fault is injected,
    how the fake counts attempts and money taken, and what the buyer does.
    """

    #: per provider: the fake's counters of attempts and of money taken, what a good start answers,
    #: the error a reused idempotency key gets, settings with a wrong secret, the API path of a start
    TERMS: dict[str, dict[str, Any]] = {
        "stripe": {
            "attempts": "payment_intents",
            "taken": "charges",
            "started": "SUCCEEDED",
            "reused_key": "IdempotencyError",
            "bad_credentials": {"api_key": "sk_test_wrong_secret_value"},
            "start_path": "/v1/payment_intents",
            "unknown_id": "pi_unknown",
        },
        "paypal": {
            "attempts": "orders",
            "taken": "captures",
            "started": "REQUIRES_ACTION",
            "reused_key": "PAYPAL_REQUEST_ID_PREVIOUSLY_USED",
            "bad_credentials": {"client_secret": "wrong_secret_value"},
            "start_path": "/v2/checkout/orders",
            "unknown_id": "5O190127TN364715T",
        },
    }

    def __init__(self, name: str, server: Any) -> None:
        from handlers.payments.base import PaymentOutcome

        self.name, self.server = name, server
        terms = self.TERMS[name]
        self.started: PaymentOutcome = PaymentOutcome[terms["started"]]
        self.reused_key_error: str = terms["reused_key"]
        self.bad_credentials: dict[str, str] = terms["bad_credentials"]
        self.unknown_id: str = terms["unknown_id"]

    def __repr__(self) -> str:
        return f"Provider({self.name})"

    @property
    def url(self) -> str:
        return str(self.server.url)

    def reset(self) -> None:
        httpx.post(self.url + "/_fake/reset").raise_for_status()

    def fail_next(self, count: int = 1, path: str | None = None, **fault: Any) -> None:
        """The next ``count`` calls to ``path`` (default: the start's) fail as ``fault`` says
        (``status=503``, ``delay=1.5``, ``drop=True``, ``after_work=True``: see scripts/fakes/common.py)."""
        spec = {"count": count, "path": path or self.TERMS[self.name]["start_path"], **fault}
        httpx.post(self.url + "/_fake/faults", json=spec).raise_for_status()

    def faults_left(self) -> list[Any]:
        return list(httpx.get(self.url + "/_fake/faults").json()["faults"])

    def record(self, order_id: str) -> dict[str, Any]:
        """The fake's counters for one of our orders (``{}`` when it never heard of it)."""
        return dict(httpx.get(self.url + "/_fake/charges").json().get("orders", {}).get(order_id, {}))

    def attempts(self, order_id: str) -> int:
        """PaymentIntents / PayPal orders made for the order."""
        return int(self.record(order_id).get(self.TERMS[self.name]["attempts"], 0))

    def taken(self, order_id: str) -> int:
        """Charges / captures: how often the buyer's money was taken for the order."""
        return int(self.record(order_id).get(self.TERMS[self.name]["taken"], 0))

    def log(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.url + "/_fake/log").json()["requests"])

    def gateway(self, **overrides: Any) -> Any:
        """The real gateway (the provider's SDK) against the fake; settings overridden by keyword."""
        from handlers.payments.paypal_gateway import PayPalGateway
        from handlers.payments.settings import PayPalSettings, StripeSettings
        from handlers.payments.stripe_gateway import StripeGateway
        from scripts.fakes import fake_paypal, fake_stripe

        common = {"timeout_seconds": 5, "max_network_retries": 2}
        if self.name == "stripe":
            values = {"api_key": fake_stripe.DEFAULT_API_KEY, "webhook_secret": "whsec_test", "api_base": self.url}
            return StripeGateway(StripeSettings(**{**common, **values, **overrides}))
        values = {
            "client_id": fake_paypal.DEFAULT_CLIENT_ID,
            "client_secret": fake_paypal.DEFAULT_CLIENT_SECRET,
            "base_url": self.url,
            "webhook_id": "WH-ID",
        }
        return PayPalGateway(PayPalSettings(**{**common, **values, **overrides}))

    def request(self, order_id: str = "order-1", amount: int = 1099, key: str | None = None) -> Any:
        """A payment request of ``amount`` cents (a Stripe card in EUR; a PayPal order in USD)."""
        from handlers.payments.base import PaymentRequest

        extra: dict[str, Any] = (
            {"currency": "EUR", "payment_method": "pm_card_visa"}
            if self.name == "stripe"
            else {"currency": "USD", "return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}
        )
        return PaymentRequest(order_id=order_id, amount=amount, idempotency_key=key or f"pay-{order_id}", **extra)

    def payment(self, method: str = "pm_card_visa") -> dict[str, Any]:
        """The ``payment`` of a PlaceOrder (``method``: the Stripe card)."""
        if self.name == "stripe":
            return {"provider": "stripe", "payment_method": method}
        return {"provider": "paypal", "return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}

    def buyer_pays(self, provider_payment_id: str) -> None:
        """What the buyer does at the provider: passes 3-D Secure (Stripe), approves the order (PayPal)."""
        action = "confirm" if self.name == "stripe" else "approve"
        httpx.post(f"{self.url}/_fake/{action}/{provider_payment_id}").raise_for_status()


@pytest.fixture(params=["stripe", "paypal"])
def provider(request: pytest.FixtureRequest, fakes: dict[str, Any]) -> Provider:
    """Each payment fake in turn (reset), with what a test needs of it: see :class:`Provider`."""
    p = Provider(request.param, fakes[request.param])
    p.reset()
    return p


@pytest.fixture(scope="session")
def servers() -> Iterator[harness.ServerChoice]:
    """PostgreSQL, RabbitMQ and Redis for the whole run: the configured ones that answer, the others
    started in Docker (testcontainers), and the ``ORDERS_*`` settings pointed at them.
    ``ORDERS_TEST_SERVERS=local|containers`` forces one; with neither, the run stops at once, saying
    what is missing and how to provide it (docs/testing.md)."""
    from worker.settings import load_settings

    addresses = harness.configured_servers(load_settings())
    choice = harness.choose_servers(
        os.environ.get("ORDERS_TEST_SERVERS"),
        {name: harness.tcp_answers(host, port) for name, (host, port) in addresses.items()},
        harness.docker_answers,
        {name: f"{host}:{port}" for name, (host, port) in addresses.items()},
    )
    if choice.error:
        pytest.exit(choice.error, returncode=pytest.ExitCode.USAGE_ERROR)
    containers = harness.Containers()
    try:
        containers.start(choice.containers)
    except Exception as exc:  # noqa: BLE001 - whatever Docker said, the run cannot go on: say it in one line
        containers.stop()
        said = " ".join(str(exc).split())[:300]
        pytest.exit(f"starting {', '.join(choice.containers)} in Docker failed: {said}", returncode=3)
    os.environ.update(containers.env)
    yield choice
    containers.stop()


@pytest.fixture(scope="session")
def test_env(
    tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, Any], servers: harness.ServerChoice
) -> Iterator[dict[str, str]]:
    """Environment for the service under test (CLI subprocesses and in-process)."""
    from worker.settings import load_settings

    broker = load_settings().rabbitmq.url.get_secret_value()
    vhost = harness.private_vhost_or_default(VHOST)
    tmp = tmp_path_factory.mktemp("orders")
    env = {
        "ORDERS_ENVIRONMENT": "development",
        "ORDERS_STRIPE__API_BASE": fakes["stripe"].url,
        "ORDERS_PAYPAL__BASE_URL": fakes["paypal"].url,
        "ORDERS_DATABASE__DBNAME": TEST_DB,
        "ORDERS_RABBITMQ__URL": harness.vhost_url(broker, vhost),
        "ORDERS_WORKER__RETRY_DELAYS_SECONDS": "[1, 2]",
        "ORDERS_WORKER__BATCH_WAIT_MS": "10",
        "ORDERS_WORKER__LIVENESS_FILE": str(tmp / "alive"),
        "ORDERS_WORKER__SHUTDOWN_TIMEOUT_SECONDS": "15",
        "ORDERS_RELAY__POLL_INTERVAL_SECONDS": "0.2",
        "ORDERS_LOGGING__FORMAT": "json",
        "ORDERS_METRICS__PORT": "0",
    }
    os.environ.update(env)
    yield {**os.environ, **env}
    if vhost:
        harness.delete_vhost(vhost)


@pytest.fixture(scope="session")
def settings(test_env: dict[str, str]) -> Iterator[Any]:
    from worker.settings import load_settings

    s = load_settings()
    harness.fresh_database(s.database)
    yield s
    harness.drop_database(s.database)


@pytest.fixture(scope="session")
def engine(settings: Any) -> Any:
    from worker import db

    return db.make_engine(settings.database, pool_size=4)


class Bus:
    """Test-side RabbitMQ: publish commands, capture events, read dead letters."""

    CAPTURE = "test.capture"

    def __init__(self, settings: Any) -> None:
        self.url = settings.rabbitmq.url.get_secret_value()
        self.delays = settings.worker.retry_delays_seconds
        self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def reset(self) -> None:
        from schema.topology import COMMAND_QUEUES, DEAD_LETTER_QUEUE, PAYMENTS_QUEUE, delay_queue
        from worker.rabbit.topology import declare_topology

        declare_topology(self.ch, self.delays)
        for q in [*COMMAND_QUEUES, PAYMENTS_QUEUE, DEAD_LETTER_QUEUE, *(delay_queue(s) for s in self.delays)]:
            self.ch.queue_purge(q)
        self.ch.queue_delete(self.CAPTURE)
        self.ch.queue_declare(self.CAPTURE, durable=True, arguments={"x-queue-type": "quorum"})
        self.ch.queue_bind(self.CAPTURE, "inventory", routing_key="#")
        self.ch.queue_bind(self.CAPTURE, "orders.events", routing_key="#")
        self._events: list[dict[str, Any]] = []

    def publish(
        self, message_type: str, body: Any, message_id: str | None = None, routing_key: str | None = None, **props: Any
    ) -> str:
        from schema.topology import COMMAND_QUEUES, COMMAND_ROUTES, COMMANDS_EXCHANGE

        keys = {r.message_type: r.routing_key for r in COMMAND_ROUTES}
        message_id = str(uuid.uuid4()) if message_id is None else message_id  # "" sends none
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.ch.basic_publish(
            COMMANDS_EXCHANGE,
            routing_key or keys.get(message_type, "order.place"),
            raw,
            pika.BasicProperties(
                message_id=message_id or None,
                type=message_type,
                content_type="application/json",
                delivery_mode=2,
                **props,
            ),
        )
        assert COMMAND_QUEUES
        return message_id

    def events(self) -> list[dict[str, Any]]:
        """All events captured so far: routing key, message id, body."""
        while True:
            method, props, body = self.ch.basic_get(self.CAPTURE, auto_ack=True)
            if method is None:
                return self._events
            self._events.append(
                {
                    "routing_key": method.routing_key,
                    "exchange": method.exchange,
                    "message_id": props.message_id,
                    "body": json.loads(body),
                }
            )

    def dead_letters(self) -> list[dict[str, Any]]:
        """Read the dead-letter queue without consuming it (requeue after)."""
        from schema.topology import DEAD_LETTER_QUEUE

        ch = self.conn.channel()
        found, tags = [], []
        while True:
            method, props, body = ch.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
            if method is None:
                break
            tags.append(method.delivery_tag)
            found.append(
                {"message_id": props.message_id, "type": props.type, "headers": props.headers or {}, "body": body}
            )
        if tags:
            ch.basic_nack(tags[-1], multiple=True, requeue=True)
        ch.close()
        return found

    def depth(self, queue: str) -> int:
        return harness.queue_depth(self.ch, queue)

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


@pytest.fixture
def bus(settings: Any) -> Iterator[Bus]:
    b = Bus(settings)
    b.reset()
    yield b
    b.close()


@pytest.fixture
def clean_db(engine: Any) -> Any:
    from worker import catalogue

    with engine.begin() as conn:
        # a process an earlier test killed may have left a session behind (e.g. behind a cut
        # proxy, where PostgreSQL cannot see its client go): it must not hold up this test
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    engine.dispose()  # our own pooled connections may have been among them
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE orders, order_items, order_transitions, order_history, payments, inbox, outbox, products, dlq_audit,"
                " console_logins, console_previews, dead_letter_index, dead_letter_groups, dead_letter_minutes, dead_letter_index_state"
            )
        )
    catalogue.upsert(engine, [catalogue.ProductRow(**p) for p in PRODUCTS])
    return engine


def _services(test_env: dict[str, str], logs: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(*args: str, **env: str) -> Proc:
        p = Proc.orders(args, {**test_env, **env}, logs / f"{args[0]}-{len(started)}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def service(test_env: dict[str, str], tmp_path: Path, settings: Any) -> Iterator[Callable[..., Proc]]:
    """Factory: ``service("worker", "--processes", "2")`` starts a CLI process."""
    yield from _services(test_env, tmp_path)


@pytest.fixture(scope="module")
def module_service(
    test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, settings: Any
) -> Iterator[Callable[..., Proc]]:
    """``service`` for processes that serve a whole module (stopped after its last test)."""
    yield from _services(test_env, tmp_path_factory.mktemp("services"))


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    made: list[TcpProxy] = []

    def make(port: int) -> TcpProxy:
        p = TcpProxy(port)
        made.append(p)
        return p

    yield make
    for p in made:
        try:
            p.down()
        except OSError:
            pass


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (no other run shares its counters), killed at the end."""
    server = RedisServer(tmp_path / "redis.log")
    yield server
    server.stop()
