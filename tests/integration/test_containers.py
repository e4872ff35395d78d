"""The servers a run starts in Docker (``scripts.harness.Containers``, testcontainers): PostgreSQL 15,
RabbitMQ 3.13 without the management plugin, Redis 7, each answering where the settings it
returns point, and a vhost made inside the broker's container.  Runs where a Docker daemon
answers; skipped elsewhere, saying so (``pytest -rs``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pika
import psycopg2
import pytest
import redis

from scripts import harness

pytestmark = pytest.mark.skipif(
    not harness.docker_answers(),
    reason="no Docker daemon answers here: the servers-in-containers path runs where one does",
)


@pytest.fixture(scope="module")
def containers() -> Iterator[harness.Containers]:
    started = harness.Containers().start(harness.SERVERS)
    yield started
    started.stop()


def test_postgresql_15_answers_where_the_settings_point(containers: harness.Containers) -> None:
    env = containers.env
    conn = psycopg2.connect(
        host=env["ORDERS_DATABASE__HOST"],
        port=int(env["ORDERS_DATABASE__PORT"]),
        user=env["ORDERS_DATABASE__USER"],
        password=env["ORDERS_DATABASE__PASSWORD"],
        dbname="postgres",
        connect_timeout=10,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            assert cur.fetchone()[0].startswith("15.")
    finally:
        conn.close()


def test_rabbitmq_takes_and_gives_back_a_message_and_makes_a_vhost_inside_its_container(
    containers: harness.Containers, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = containers.env["ORDERS_RABBITMQ__URL"]
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        queue = f"containers-{uuid.uuid4().hex[:8]}"
        ch.queue_declare(queue, auto_delete=True)
        ch.basic_publish("", queue, b"hello")
        harness.wait_until(lambda: harness.queue_depth(ch, queue) == 1, timeout=10, what="the message")
        assert ch.basic_get(queue, auto_ack=True)[2] == b"hello"
        assert conn.server_properties["version"].startswith(b"3.13")  # type: ignore[index]
    finally:
        conn.close()
    monkeypatch.setenv("ORDERS_TEST_RABBITMQCTL", containers.env["ORDERS_TEST_RABBITMQCTL"])
    if not harness.have_rabbitmqctl():
        pytest.skip("docker's CLI is missing: vhosts cannot be made in the container (runs use '/')")
    harness.create_vhost("orders-containers-test", fresh=True)
    made = pika.BlockingConnection(pika.URLParameters(harness.vhost_url(url, "orders-containers-test")))
    made.close()
    assert harness.delete_vhost("orders-containers-test")


def test_redis_7_answers_where_the_settings_point(containers: harness.Containers) -> None:
    client = redis.Redis(
        host=containers.env["ORDERS_REDIS__HOST"], port=int(containers.env["ORDERS_REDIS__PORT"]), socket_timeout=5
    )
    try:
        assert client.info("server")["redis_version"].startswith("7.")
        client.set("containers-test", "1")
        assert client.get("containers-test") == b"1"
    finally:
        client.close()
