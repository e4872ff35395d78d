"""The shim's asyncio RabbitMQ channel against the real broker: confirms,
unroutable commands, direct reply-to, and a broker that goes away or never answers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from typing import Any

import pika
import pytest

from schema.topology import COMMANDS_EXCHANGE
from scripts import harness
from worker.errors import ConnectionLost, PublishNotConfirmed
from worker.rabbit.connection import Outgoing
from worker.shim.amqp import AsyncChannel
from worker.shim.errors import ApiError
from worker.shim.publisher import CommandPublisher, Envelope


def place(message_id: str, routing_key: str = "order.place") -> Outgoing:
    return Outgoing(
        COMMANDS_EXCHANGE, routing_key, b'{"probe": true}', {"message_id": message_id, "type": "PlaceOrder"}
    )


def drain(bus: Any, queue: str) -> list[str]:
    ids = []
    while True:
        method, props, _ = bus.ch.basic_get(queue, auto_ack=True)
        if method is None:
            return ids
        ids.append(props.message_id)


def test_concurrent_publishes_are_each_confirmed_and_each_arrives_once(settings, bus):
    channel = AsyncChannel(settings.rabbitmq.url.get_secret_value(), 30)
    ids = [f"probe-{i}" for i in range(400)]

    async def run() -> None:
        await asyncio.gather(*(channel.publish(place(i), timeout=10) for i in ids))
        channel.close()

    asyncio.run(run())
    assert sorted(drain(bus, "orders.place")) == sorted(ids)


def test_an_unroutable_command_fails_alone_and_the_channel_stays_usable(settings, bus):
    channel = AsyncChannel(settings.rabbitmq.url.get_secret_value(), 30)

    async def run() -> list[Any]:
        outcomes = await asyncio.gather(
            channel.publish(place("lost", routing_key="order.nowhere"), timeout=10),
            channel.publish(place("kept-1"), timeout=10),
            return_exceptions=True,
        )
        await channel.publish(place("kept-2"), timeout=10)
        channel.close()
        return outcomes

    unroutable, kept = asyncio.run(run())
    assert isinstance(unroutable, PublishNotConfirmed) and kept is None
    assert sorted(drain(bus, "orders.place")) == ["kept-1", "kept-2"]


def test_a_request_gets_its_own_reply_through_direct_reply_to(settings, bus):
    url = settings.rabbitmq.url.get_secret_value()
    stop = threading.Event()

    def responder() -> None:  # a stand-in worker: answers each command with its own message id
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        while not stop.is_set():
            method, props, _ = ch.basic_get("orders.place", auto_ack=True)
            if method is None:
                conn.sleep(0.01)
                continue
            if props.message_id != "unanswered":
                ch.basic_publish(
                    "",
                    props.reply_to,
                    json.dumps({"for": props.message_id}).encode(),
                    pika.BasicProperties(correlation_id=props.correlation_id),
                )
        conn.close()

    thread = threading.Thread(target=responder, daemon=True)
    thread.start()
    channel = AsyncChannel(url, 30)

    async def run() -> tuple[list[bytes | None], bytes | None, float]:
        answers = await asyncio.gather(*(channel.request(place(f"ask-{i}"), timeout=10) for i in range(20)))
        started = time.monotonic()
        silent = await channel.request(place("unanswered"), timeout=0.5)
        channel.close()
        return answers, silent, time.monotonic() - started

    try:
        answers, silent, waited = asyncio.run(run())
    finally:
        stop.set()
        thread.join(10)
    assert [json.loads(a or b"{}").get("for") for a in answers] == [f"ask-{i}" for i in range(20)]
    assert silent is None and 0.4 < waited < 3


def test_a_cut_connection_fails_at_once_and_the_next_publish_reconnects(settings, bus, tcp_proxy):
    broker = settings.rabbitmq.url.get_secret_value()
    proxy = tcp_proxy(harness.amqp_port(broker))
    url = harness.with_amqp_port(broker, proxy.port)
    channel = AsyncChannel(url, 30)

    async def run() -> tuple[BaseException | None, float]:
        await channel.publish(place("before"), timeout=10)
        proxy.down()
        await asyncio.sleep(0.2)  # the loop notices the closed socket
        started, failure = time.monotonic(), None
        try:
            await channel.publish(place("during"), timeout=10)
        except ConnectionLost as exc:
            failure = exc
        elapsed = time.monotonic() - started
        proxy.up()
        await channel.publish(place("after"), timeout=10)
        channel.close()
        return failure, elapsed

    failure, elapsed = asyncio.run(run())
    assert isinstance(failure, ConnectionLost) and elapsed < 3, "refused at once, not after the timeout"
    assert sorted(drain(bus, "orders.place")) == ["after", "before"]


def test_a_broker_that_never_answers_costs_a_request_its_timeout_and_then_503(settings):
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never speaks AMQP
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/"
    publisher = CommandPublisher(AsyncChannel(url, 30), timeout=0.5)
    command = Envelope(COMMANDS_EXCHANGE, "order.place", "PlaceOrder", str(uuid.uuid4()), {"probe": True})

    async def run() -> tuple[ApiError, float]:
        started = time.monotonic()
        with pytest.raises(ApiError) as refused:
            await publisher.send(command)
        publisher.close()
        return refused.value, time.monotonic() - started

    try:
        error, elapsed = asyncio.run(run())
    finally:
        silent.close()
    assert error.status == 503 and error.headers["Retry-After"]
    assert 0.4 < elapsed < 2
