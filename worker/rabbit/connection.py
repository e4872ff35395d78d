"""One blocking RabbitMQ connection for a consumer or a small publisher, free of pika types outside.

pika's exceptions become :class:`worker.errors.ConnectionLost` /
:class:`worker.errors.PublishNotConfirmed` here, at the border.  pika rules
this package keeps: one connection per thread, created in that thread;
heartbeats are serviced only while the I/O loop runs, so callers keep the
work between two ``poll`` calls short.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from worker.errors import ConnectionLost, PublishNotConfirmed


@dataclass
class Delivery:
    """A received message, free of pika types."""

    delivery_tag: int
    exchange: str
    routing_key: str
    #: the queue it was consumed from (by consumer tag), which decides the commands it may carry
    queue: str
    body: bytes
    message_id: str | None
    message_type: str | None
    correlation_id: str | None
    reply_to: str | None
    content_type: str | None
    headers: dict[str, Any]
    redelivered: bool
    timestamp: int | None = None
    app_id: str | None = None
    #: the publisher's broker user, as RabbitMQ checked it (``user_id`` property); None when it named none
    user_id: str | None = None

    def properties(self) -> dict[str, Any]:
        """The AMQP properties to republish this message with (without ``user_id``: a republish is the
        republisher's own, see :mod:`worker.identity`)."""
        return {
            "message_id": self.message_id,
            "type": self.message_type,
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
            "content_type": self.content_type,
            "headers": dict(self.headers),
            "timestamp": self.timestamp,
            "app_id": self.app_id,
        }


@dataclass
class Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any] = field(default_factory=dict)


def basic_properties(properties: dict[str, Any]) -> BasicProperties:
    values = {k: v for k, v in properties.items() if v is not None}
    values.setdefault("delivery_mode", 2)
    values.setdefault("content_type", "application/json")
    return BasicProperties(**values)


def node_urls(url: str) -> list[str]:
    """The node URLs of ``url`` (one, or several comma-separated), in a shuffled order.

    Each process takes the nodes in an order of its own, so the connections
    of a pool spread over the cluster and a dead node costs each process one
    failed attempt at most, not every process the same one.
    """
    urls = [u.strip() for u in url.split(",") if u.strip()]
    random.shuffle(urls)
    return urls


def connection_parameters(url: str, heartbeat: int, wait_out_alarms: bool = False) -> list[pika.URLParameters]:
    """One parameter set per node of ``url``, shuffled: pika tries them in turn.

    A connection that the broker blocks (``connection.blocked``: a memory or
    disk alarm) is closed by pika after ``max(2 x heartbeat, 30)`` seconds,
    unless ``wait_out_alarms``: then it waits as long as the alarm lasts (the
    relay's publisher, see :mod:`worker.rabbit.publisher`); heartbeats still
    close it when the broker itself is gone.
    """
    found = []
    for node in node_urls(url):
        params = pika.URLParameters(node)
        params.heartbeat = heartbeat
        params.blocked_connection_timeout = None if wait_out_alarms else max(heartbeat * 2, 30)
        params.connection_attempts = 1
        params.socket_timeout = 5
        found.append(params)
    if not found:
        raise ConnectionLost("rabbitmq.url names no node")
    return found


class NodeRotation:
    """For connections that take one parameter set (select and asyncio adapters): the next node each time."""

    def __init__(self, url: str, heartbeat: int, wait_out_alarms: bool = False) -> None:
        self._params = connection_parameters(url, heartbeat, wait_out_alarms)
        self._next = 0

    def next(self) -> pika.URLParameters:
        params = self._params[self._next % len(self._params)]
        self._next += 1
        return params


PIKA_ERRORS = (pika.exceptions.AMQPError, OSError)


def lost(exc: BaseException) -> ConnectionLost:
    return ConnectionLost(f"{type(exc).__name__}: {exc}")


# -- blocking connection: consumers and small publishers ---------------------------


class BlockingBroker:
    """One blocking connection: a consuming channel and a confirmed publishing channel."""

    def __init__(self, url: str, heartbeat: int = 30) -> None:
        self._params = connection_parameters(url, heartbeat)
        self._conn: pika.BlockingConnection | None = None
        self._consume: BlockingChannel | None = None
        self._publish: BlockingChannel | None = None
        self._buffer: list[Delivery] = []
        self._queues: dict[str, str] = {}  # consumer tag -> queue

    def connect(self) -> BlockingBroker:
        try:
            self._conn = pika.BlockingConnection(self._params)
            self._publish = self._conn.channel()
            self._publish.confirm_delivery()
        except PIKA_ERRORS as exc:
            self.close()
            raise lost(exc) from exc
        return self

    @property
    def is_open(self) -> bool:
        return self._conn is not None and self._conn.is_open

    def channel(self) -> BlockingChannel:
        assert self._publish is not None, "connect() first"
        return self._publish

    # consuming

    def consume(self, queues: Iterable[str], prefetch: int) -> None:
        assert self._conn is not None, "connect() first"
        try:
            self._consume = self._conn.channel()
            self._consume.basic_qos(prefetch_count=prefetch)
            for queue in queues:
                tag = self._consume.basic_consume(queue, self._on_message)
                self._queues[tag] = queue
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc

    def _on_message(self, _ch: Any, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        self._buffer.append(to_delivery(method, props, body, self._queues.get(method.consumer_tag, "")))

    def poll(self, max_messages: int, first_wait: float, fill_wait: float) -> list[Delivery]:
        """Wait up to ``first_wait`` for a message, then up to ``fill_wait`` to fill a batch."""
        assert self._conn is not None
        try:
            if not self._buffer:
                self._conn.process_data_events(time_limit=first_wait)
            deadline = time.monotonic() + fill_wait
            while self._buffer and len(self._buffer) < max_messages:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._conn.process_data_events(time_limit=remaining)
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc
        batch, self._buffer = self._buffer[:max_messages], self._buffer[max_messages:]
        return batch

    def held(self) -> int:
        return len(self._buffer)

    def ack(self, delivery_tag: int) -> None:
        """Ack this one message (deliveries settled out of order)."""
        self._ack(delivery_tag, multiple=False)

    def ack_through(self, delivery_tag: int) -> None:
        """Ack every message up to and including ``delivery_tag``."""
        self._ack(delivery_tag, multiple=True)

    def _ack(self, delivery_tag: int, multiple: bool) -> None:
        assert self._consume is not None
        try:
            self._consume.basic_ack(delivery_tag, multiple=multiple)
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc

    def cancel(self) -> list[Delivery]:
        """Stop deliveries; return what is still buffered (to finish and ack)."""
        try:
            if self._consume is not None and self._consume.is_open:
                for tag in list(self._queues):
                    self._consume.basic_cancel(tag)
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc
        self._queues.clear()
        rest, self._buffer = self._buffer, []
        return rest

    def sleep(self, seconds: float) -> None:
        """Wait while servicing heartbeats."""
        assert self._conn is not None
        try:
            self._conn.sleep(seconds)
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc

    # publishing

    def publish(self, message: Outgoing, mandatory: bool = False) -> None:
        """Publish and wait for the broker's confirm."""
        try:
            self.channel().basic_publish(
                message.exchange,
                message.routing_key,
                message.body,
                basic_properties(message.properties),
                mandatory=mandatory,
            )
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
            raise PublishNotConfirmed(f"{message.exchange}/{message.routing_key}: {type(exc).__name__}") from exc
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc

    def queue_depth(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue."""
        try:
            ok = self.channel().queue_declare(queue, passive=True)
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc
        return ok.method.message_count, ok.method.consumer_count

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except PIKA_ERRORS:
                pass


# -- the HTTP shim (worker/shim/amqp.py holds its asyncio channel) -------------------

#: RabbitMQ's pseudo-queue for direct reply-to (no queue is declared)
REPLY_TO = "amq.rabbitmq.reply-to"


def to_delivery(method: Basic.Deliver, props: BasicProperties, body: bytes, queue: str) -> Delivery:
    return Delivery(
        delivery_tag=method.delivery_tag,
        exchange=method.exchange,
        routing_key=method.routing_key,
        queue=queue,
        body=body,
        message_id=props.message_id,
        message_type=props.type,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        content_type=props.content_type,
        headers=dict(props.headers or {}),
        redelivered=bool(method.redelivered),
        timestamp=props.timestamp,
        app_id=props.app_id,
        user_id=props.user_id,
    )
