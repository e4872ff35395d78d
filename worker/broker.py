"""RabbitMQ: the only module that imports pika.

Topology, the batch consumer used by the workers, a blocking confirmed
publisher (shim, CLI, retries) and a pipelined confirmed publisher (relay).
pika's exceptions become :class:`worker.errors.ConnectionLost` /
:class:`worker.errors.PublishNotConfirmed` here, at the border.

pika rules this module keeps: one connection per thread, created in that
thread; heartbeats are serviced only while the I/O loop runs, so callers
keep the work between two ``poll`` calls short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from worker.errors import ConnectionLost, PublishNotConfirmed

# -- the public contract (DESIGN.md) -----------------------------------------

COMMANDS_EXCHANGE = "orders.commands"
#: queue -> routing key of the commands upstream services publish
COMMAND_QUEUES = {
    "orders.place": "order.place",
    "orders.cancel": "order.cancel",
    "orders.payment-confirmed": "payment.confirmed",
}
INVENTORY_EXCHANGE = "inventory"
EVENTS_EXCHANGE = "orders.events"
DEAD_LETTER_QUEUE = "orders.dead-letter"

# -- internal names -------------------------------------------------------------

#: internal commands of the payment step, published by the relay
INTERNAL_EXCHANGE = "orders.internal"
PAYMENTS_QUEUE = "orders.payments"
PAYMENT_ROUTING_KEYS = ("payment.start", "payment.capture", "payment.cancel", "payment.refund", "payment.failed")
DEAD_LETTER_EXCHANGE = "orders.dlx"
#: headers exchange in front of the delay queues (header ``x-delay-tier``)
DELAY_EXCHANGE = "orders.delay"
#: redeliveries (e.g. a message that crashes its worker) before the broker dead-letters it
DELIVERY_LIMIT = 20

QUEUE_ROUTES = {**COMMAND_QUEUES, **{PAYMENTS_QUEUE: "payment.*"}}
QUEUE_EXCHANGES = {**{q: COMMANDS_EXCHANGE for q in COMMAND_QUEUES}, PAYMENTS_QUEUE: INTERNAL_EXCHANGE}


def delay_queue(seconds: int) -> str:
    return f"orders.delay.{seconds}s"


_QUORUM = {
    "x-queue-type": "quorum",
    # at-least-once dead-lettering needs reject-publish (else it falls back to at-most-once)
    "x-overflow": "reject-publish",
    "x-dead-letter-strategy": "at-least-once",
}


def declare_topology(channel: BlockingChannel, delays: Iterable[int]) -> None:
    """Declare every exchange, queue and binding; safe to repeat."""
    try:
        for name, kind in (
            (COMMANDS_EXCHANGE, "direct"), (INTERNAL_EXCHANGE, "direct"), (INVENTORY_EXCHANGE, "topic"),
            (EVENTS_EXCHANGE, "topic"), (DEAD_LETTER_EXCHANGE, "fanout"), (DELAY_EXCHANGE, "headers"),
        ):
            channel.exchange_declare(name, exchange_type=kind, durable=True)
        channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
        work_args = {**_QUORUM, "x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
        for queue, key in COMMAND_QUEUES.items():
            channel.queue_declare(queue, durable=True, arguments=work_args)
            channel.queue_bind(queue, COMMANDS_EXCHANGE, routing_key=key)
        channel.queue_declare(PAYMENTS_QUEUE, durable=True, arguments=work_args)
        for key in PAYMENT_ROUTING_KEYS:
            channel.queue_bind(PAYMENTS_QUEUE, INTERNAL_EXCHANGE, routing_key=key)
        for seconds in delays:
            # expired messages go back through the default exchange to the queue
            # named by their routing key: the queue they failed on
            queue = delay_queue(seconds)
            channel.queue_declare(queue, durable=True, arguments={
                **_QUORUM, "x-message-ttl": seconds * 1000, "x-dead-letter-exchange": "",
            })
            channel.queue_bind(queue, DELAY_EXCHANGE, arguments={"x-match": "all", "x-delay-tier": f"{seconds}s"})
    except pika.exceptions.AMQPError as exc:
        raise ConnectionLost(f"declaring topology failed: {exc!r}") from exc


# -- messages ------------------------------------------------------------------------


@dataclass
class Delivery:
    """A received message, free of pika types."""

    delivery_tag: int
    exchange: str
    routing_key: str
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

    def properties(self) -> dict[str, Any]:
        """The AMQP properties to republish this message with."""
        return {
            "message_id": self.message_id, "type": self.message_type,
            "correlation_id": self.correlation_id, "reply_to": self.reply_to,
            "content_type": self.content_type, "headers": dict(self.headers),
            "timestamp": self.timestamp, "app_id": self.app_id,
        }


@dataclass
class Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any] = field(default_factory=dict)


def _props(properties: dict[str, Any]) -> BasicProperties:
    values = {k: v for k, v in properties.items() if v is not None}
    values.setdefault("delivery_mode", 2)
    values.setdefault("content_type", "application/json")
    return BasicProperties(**values)


def connection_parameters(url: str, heartbeat: int) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = max(heartbeat * 2, 30)
    params.connection_attempts = 1
    params.socket_timeout = 5
    return params


_PIKA_ERRORS = (pika.exceptions.AMQPError, OSError)


def _lost(exc: BaseException) -> ConnectionLost:
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

    def connect(self) -> "BlockingBroker":
        try:
            self._conn = pika.BlockingConnection(self._params)
            self._publish = self._conn.channel()
            self._publish.confirm_delivery()
        except _PIKA_ERRORS as exc:
            self.close()
            raise _lost(exc) from exc
        return self

    @property
    def is_open(self) -> bool:
        return self._conn is not None and self._conn.is_open

    def channel(self) -> BlockingChannel:
        assert self._publish is not None, "connect() first"
        return self._publish

    def declare_topology(self, delays: Iterable[int]) -> None:
        declare_topology(self.channel(), delays)

    # consuming

    def consume(self, queues: Iterable[str], prefetch: int) -> None:
        assert self._conn is not None, "connect() first"
        try:
            self._consume = self._conn.channel()
            self._consume.basic_qos(prefetch_count=prefetch)
            for queue in queues:
                tag = self._consume.basic_consume(queue, self._on_message)
                self._queues[tag] = queue
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc

    def _on_message(self, _ch: Any, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        self._buffer.append(Delivery(
            delivery_tag=method.delivery_tag, exchange=method.exchange, routing_key=method.routing_key,
            queue=self._queues.get(method.consumer_tag, ""), body=body, message_id=props.message_id,
            message_type=props.type, correlation_id=props.correlation_id, reply_to=props.reply_to,
            content_type=props.content_type, headers=dict(props.headers or {}),
            redelivered=bool(method.redelivered), timestamp=props.timestamp, app_id=props.app_id,
        ))

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
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc
        batch, self._buffer = self._buffer[:max_messages], self._buffer[max_messages:]
        return batch

    def held(self) -> int:
        return len(self._buffer)

    def ack_through(self, delivery_tag: int) -> None:
        """Ack every message up to and including ``delivery_tag``."""
        assert self._consume is not None
        try:
            self._consume.basic_ack(delivery_tag, multiple=True)
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc

    def cancel(self) -> list[Delivery]:
        """Stop deliveries; return what is still buffered (to finish and ack)."""
        try:
            if self._consume is not None and self._consume.is_open:
                for tag in list(self._queues):
                    self._consume.basic_cancel(tag)
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc
        self._queues.clear()
        rest, self._buffer = self._buffer, []
        return rest

    def sleep(self, seconds: float) -> None:
        """Wait while servicing heartbeats."""
        assert self._conn is not None
        try:
            self._conn.sleep(seconds)
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc

    # publishing

    def publish(self, message: Outgoing, mandatory: bool = False) -> None:
        """Publish and wait for the broker's confirm."""
        try:
            self.channel().basic_publish(
                message.exchange, message.routing_key, message.body, _props(message.properties),
                mandatory=mandatory,
            )
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
            raise PublishNotConfirmed(f"{message.exchange}/{message.routing_key}: {type(exc).__name__}") from exc
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc

    def queue_depth(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue."""
        try:
            ok = self.channel().queue_declare(queue, passive=True)
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc
        return ok.method.message_count, ok.method.consumer_count

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except _PIKA_ERRORS:
                pass


# -- pipelined confirmed publisher (the relay) ------------------------------------


class PipelinedPublisher:
    """Publishes a batch without waiting per message, then waits for all confirms.

    Built on ``SelectConnection`` and its I/O loop, driven from the caller's
    thread; the confirms of one batch usually arrive as a few ``multiple``
    acks.
    """

    def __init__(self, url: str, heartbeat: int = 30) -> None:
        self._params = connection_parameters(url, heartbeat)
        self._conn: pika.SelectConnection | None = None
        self._channel: Any = None
        self._ready = False
        self._error: str | None = None
        self._next_tag = 0
        self._unconfirmed: set[int] = set()
        self._nacked = 0

    def connect(self, timeout: float = 10) -> "PipelinedPublisher":
        self._conn = pika.SelectConnection(
            self._params, on_open_callback=self._on_open,
            on_open_error_callback=self._on_failed, on_close_callback=self._on_failed,
        )
        # driven by poll() from this thread, as BlockingConnection drives it
        self._conn.ioloop.activate_poller()
        self._run_until(lambda: self._ready, timeout, "connecting")
        return self

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_failed)
        channel.confirm_delivery(self._on_confirm, callback=lambda _f: setattr(self, "_ready", True))

    def _on_failed(self, *args: Any) -> None:
        self._error = repr(args[-1]) if args else "closed"
        self._ready = False

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = {t for t in self._unconfirmed if t <= method.delivery_tag} if method.multiple else {method.delivery_tag}
        self._unconfirmed -= tags
        if isinstance(method, Basic.Nack):
            self._nacked += len(tags)

    def _run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        assert self._conn is not None
        deadline = time.monotonic() + timeout
        ioloop = self._conn.ioloop
        while not done():
            if self._error is not None:
                raise ConnectionLost(f"{what}: {self._error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishNotConfirmed(f"{what}: no answer within {timeout}s")
            timer = ioloop.call_later(min(remaining, 0.5), lambda: None)  # bounds the poll
            try:
                ioloop.poll()
                ioloop.process_timeouts()
            except _PIKA_ERRORS as exc:
                raise _lost(exc) from exc
            finally:
                ioloop.remove_timeout(timer)

    def publish_batch(self, messages: list[Outgoing], timeout: float = 30) -> None:
        """Publish all, then block until every one is confirmed; raise otherwise."""
        if not self._ready or self._channel is None:
            raise ConnectionLost(self._error or "publisher not connected")
        self._nacked = 0
        try:
            for m in messages:
                self._channel.basic_publish(m.exchange, m.routing_key, m.body, _props(m.properties))
                self._next_tag += 1
                self._unconfirmed.add(self._next_tag)
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc
        self._run_until(lambda: not self._unconfirmed, timeout, "waiting for confirms")
        if self._nacked:
            raise PublishNotConfirmed(f"broker nacked {self._nacked} message(s)")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
                deadline = time.monotonic() + 2
                while not conn.is_closed and time.monotonic() < deadline:
                    conn.ioloop.poll()
                    conn.ioloop.process_timeouts()
            except _PIKA_ERRORS:
                pass
        if conn is not None:
            conn.ioloop.deactivate_poller()
            conn.ioloop.close()
