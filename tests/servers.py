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


@pytest.fixture(scope="session")
def test_env(tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, Any]) -> Iterator[dict[str, str]]:
    """Environment for the service under test (CLI subprocesses and in-process)."""
    vhost = harness.private_vhost_or_default(VHOST)
    tmp = tmp_path_factory.mktemp("orders")
    env = {
        "ORDERS_ENVIRONMENT": "development",
        "ORDERS_STRIPE__API_BASE": fakes["stripe"].url,
        "ORDERS_PAYPAL__BASE_URL": fakes["paypal"].url,
        "ORDERS_DATABASE__DBNAME": TEST_DB,
        "ORDERS_RABBITMQ__URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost.replace('/', '%2F')}",
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
        from worker.broker import COMMAND_QUEUES, DEAD_LETTER_QUEUE, PAYMENTS_QUEUE, declare_topology, delay_queue

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
        from worker.broker import COMMAND_QUEUES, COMMANDS_EXCHANGE

        keys = {"PlaceOrder": "order.place", "CancelOrder": "order.cancel", "PaymentConfirmed": "payment.confirmed"}
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
        from worker.broker import DEAD_LETTER_QUEUE

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
            text("TRUNCATE orders, order_items, order_transitions, payments, inbox, outbox, products, dlq_audit")
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
