"""RabbitMQ for the workers, the relay and the CLI (the shim's asyncio channel is
in :mod:`worker.shim.amqp`; no other module imports pika).

Topology, the batch consumer used by the workers, a blocking confirmed
publisher (CLI, retries) and a pipelined confirmed publisher (relay).
pika's exceptions become :class:`worker.errors.ConnectionLost` /
:class:`worker.errors.PublishNotConfirmed` here, at the border.

pika rules this module keeps: one connection per thread, created in that
thread; heartbeats are serviced only while the I/O loop runs, so callers
keep the work between two ``poll`` calls short.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from worker.errors import BrokerError, ConnectionLost, PublishNotConfirmed

# -- the public contract (DESIGN.md) -----------------------------------------

COMMANDS_EXCHANGE = "orders.commands"
#: queue -> routing key of the commands upstream services publish
COMMAND_QUEUES = {
    "orders.place": "order.place",
    "orders.cancel": "order.cancel",
    "orders.payment-confirmed": "payment.confirmed",
}
#: queue -> the one command type it accepts ("A queue accepts only its own command")
COMMAND_TYPES = {
    "orders.place": "PlaceOrder",
    "orders.cancel": "CancelOrder",
    "orders.payment-confirmed": "PaymentConfirmed",
}
INVENTORY_EXCHANGE = "inventory"
EVENTS_EXCHANGE = "orders.events"
DEAD_LETTER_QUEUE = "orders.dead-letter"

# -- internal names -------------------------------------------------------------

#: internal commands of the payment step, published by the relay
INTERNAL_EXCHANGE = "orders.internal"
PAYMENTS_QUEUE = "orders.payments"
PAYMENT_ROUTING_KEYS = (
    "payment.start",
    "payment.capture",
    "payment.cancel",
    "payment.refund",
    "payment.failed",
    "payment.settle",
)
#: the internal payment-step commands, the only types ``orders.payments`` accepts
PAYMENT_STEP_TYPES = frozenset(
    {"StartPayment", "CapturePayment", "CancelPayment", "RefundPayment", "PaymentFailed", "SettlePayment"}
)
DEAD_LETTER_EXCHANGE = "orders.dlx"
#: headers exchange in front of the delay queues, routing on header DELAY_HEADER
DELAY_EXCHANGE = "orders.delay"
#: every exchange :func:`declare_topology` declares
EXCHANGES = (
    COMMANDS_EXCHANGE,
    INTERNAL_EXCHANGE,
    INVENTORY_EXCHANGE,
    EVENTS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DELAY_EXCHANGE,
)
#: the tier header; not ``x-…``: a headers exchange ignores x- headers when matching
DELAY_HEADER = "orders-delay-tier"
#: redeliveries (e.g. a message that crashes its worker) before the broker dead-letters it
DELIVERY_LIMIT = 20

QUEUE_ROUTES = {**COMMAND_QUEUES, **{PAYMENTS_QUEUE: "payment.*"}}
QUEUE_EXCHANGES = {**{q: COMMANDS_EXCHANGE for q in COMMAND_QUEUES}, PAYMENTS_QUEUE: INTERNAL_EXCHANGE}
#: queue -> the message types a delivery on it may carry; anything else is an invalid message.
#: A retry comes back to the queue it failed on (delay tiers), so it is held to the same rule.
QUEUE_ACCEPTS: dict[str, frozenset[str]] = {
    **{queue: frozenset({kind}) for queue, kind in COMMAND_TYPES.items()},
    PAYMENTS_QUEUE: PAYMENT_STEP_TYPES,
}


def wrong_queue(queue: str, message_type: str | None) -> str | None:
    """Why a message of this type may not be taken from ``queue``; None when it may."""
    accepted = QUEUE_ACCEPTS.get(queue, frozenset())
    if message_type in accepted:
        return None
    takes = ", ".join(sorted(accepted)) or "no commands"
    return f"message type {message_type!r} does not belong on queue {queue!r} (it takes {takes})"


def queue_of(message_type: str | None) -> str | None:
    """The queue a command or payment step of this type is consumed from; None for an unknown type."""
    return next((queue for queue, kinds in QUEUE_ACCEPTS.items() if message_type in kinds), None)


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
            (COMMANDS_EXCHANGE, "direct"),
            (INTERNAL_EXCHANGE, "direct"),
            (INVENTORY_EXCHANGE, "topic"),
            (EVENTS_EXCHANGE, "topic"),
            (DEAD_LETTER_EXCHANGE, "fanout"),
            (DELAY_EXCHANGE, "headers"),
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
            channel.queue_declare(
                queue,
                durable=True,
                arguments={
                    **_QUORUM,
                    "x-message-ttl": seconds * 1000,
                    "x-dead-letter-exchange": "",
                },
            )
            channel.queue_bind(queue, DELAY_EXCHANGE, arguments={"x-match": "all", DELAY_HEADER: f"{seconds}s"})
            # the binding of versions before 0.1 matched every message (x- headers are ignored)
            channel.queue_unbind(queue, DELAY_EXCHANGE, arguments={"x-match": "all", "x-delay-tier": f"{seconds}s"})
    except pika.exceptions.AMQPError as exc:
        raise ConnectionLost(f"declaring topology failed: {exc!r}") from exc


# -- messages ------------------------------------------------------------------------


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

    def properties(self) -> dict[str, Any]:
        """The AMQP properties to republish this message with."""
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

    def connect(self) -> BlockingBroker:
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
        self._buffer.append(_delivery(method, props, body, self._queues.get(method.consumer_tag, "")))

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
                message.exchange,
                message.routing_key,
                message.body,
                basic_properties(message.properties),
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


class _HeldWritesConnection(pika.SelectConnection):
    """A ``SelectConnection`` that can hold its outgoing bytes and write them at once.

    pika writes every frame as a buffer of its own and sends each with a
    system call of its own: three per message (method, header, body).
    Inside :meth:`held_writes` the frames of a whole batch are joined and
    handed to the transport as one buffer, so a batch of 500 messages costs a
    few ``send`` calls instead of 1,500, on both ends of the socket.
    """

    _held: list[bytes] | None = None

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        else:
            super()._adapter_emit_data(data)

    @contextlib.contextmanager
    def held_writes(self) -> Iterator[None]:
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            if held and self._transport is not None:
                super()._adapter_emit_data(b"".join(held))


class PipelinedPublisher:
    """Publishes a batch without waiting per message, then waits for all confirms.

    Built on ``SelectConnection`` and its I/O loop, driven from the caller's
    thread; the confirms of one batch usually arrive as a few ``multiple``
    acks.
    """

    def __init__(self, url: str, heartbeat: int = 30) -> None:
        self._params = connection_parameters(url, heartbeat)
        self._conn: _HeldWritesConnection | None = None
        self._channel: Any = None
        self._ready = False
        self._error: str | None = None
        self._next_tag = 0
        self._unconfirmed: collections.deque[int] = collections.deque()
        self._nacked = 0

    def connect(self, timeout: float = 10) -> PipelinedPublisher:
        self._conn = _HeldWritesConnection(
            self._params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_failed,
            on_close_callback=self._on_failed,
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
        if method.multiple:  # tags are sequential: drop everything up to this one
            before = len(self._unconfirmed)
            while self._unconfirmed and self._unconfirmed[0] <= method.delivery_tag:
                self._unconfirmed.popleft()
            count = before - len(self._unconfirmed)
        else:
            count = 1
            try:
                self._unconfirmed.remove(method.delivery_tag)
            except ValueError:
                count = 0
        if isinstance(method, Basic.Nack):
            self._nacked += count

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
        assert self._conn is not None
        try:
            with self._conn.held_writes():
                for m in messages:
                    self._channel.basic_publish(m.exchange, m.routing_key, m.body, basic_properties(m.properties))
                    self._next_tag += 1
                    self._unconfirmed.append(self._next_tag)
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


# -- the HTTP shim (worker/shim/amqp.py holds its asyncio channel) -------------------

#: RabbitMQ's pseudo-queue for direct reply-to (no queue is declared)
REPLY_TO = "amq.rabbitmq.reply-to"


# -- operator tools: queue depths, topology check, the dead-letter queue ----------

#: an exclusive queue used as a lock: one ``orders dlq`` session at a time,
#: released by the broker when the holder's connection goes, even on SIGKILL
DLQ_LOCK_QUEUE = "orders.dead-letter.session"
#: seconds without a new delivery after which a session stops waiting for more
DLQ_IDLE_SECONDS = 2.0
#: unacked messages one session may hold (AMQP's prefetch count is 16 bits)
DLQ_MAX_HELD = 65535


class DeadLetterQueueBusy(BrokerError):
    """Another ``orders dlq`` command holds the dead-letter queue."""


def _delivery(method: Basic.Deliver, props: BasicProperties, body: bytes, queue: str) -> Delivery:
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
    )


def _passive_check(url: str, names: list[tuple[str, str]]) -> dict[str, tuple[int, int] | None]:
    """Passively declare ("exchange"|"queue", name) pairs; None where missing.

    A failed passive declare closes its channel, so a new one is opened after each.
    """
    found: dict[str, tuple[int, int] | None] = {}
    try:
        conn = pika.BlockingConnection(connection_parameters(url, 30))
    except _PIKA_ERRORS as exc:
        raise _lost(exc) from exc
    try:
        channel = conn.channel()
        for kind, name in names:
            try:
                if kind == "exchange":
                    channel.exchange_declare(name, passive=True)
                    found[name] = (0, 0)
                else:
                    ok = channel.queue_declare(name, passive=True)
                    found[name] = (ok.method.message_count, ok.method.consumer_count)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                found[name] = None
                channel = conn.channel()
    except _PIKA_ERRORS as exc:
        raise _lost(exc) from exc
    finally:
        if conn.is_open:
            conn.close()
    return found


def queue_depths(url: str, queues: Iterable[str]) -> dict[str, tuple[int, int] | None]:
    """(ready messages, consumers) per queue; None for a queue that does not exist."""
    return _passive_check(url, [("queue", q) for q in queues])


def missing_topology(url: str, delays: Iterable[int]) -> list[str]:
    """Exchanges and queues of :func:`declare_topology` that are not there.

    AMQP has no passive check for bindings; ``orders topology`` repairs those too.
    """
    exchanges = EXCHANGES
    queues = [DEAD_LETTER_QUEUE, *COMMAND_QUEUES, PAYMENTS_QUEUE, *(delay_queue(s) for s in delays)]
    found = _passive_check(url, [("exchange", e) for e in exchanges] + [("queue", q) for q in queues])
    return [f"exchange {e}" for e in exchanges if found[e] is None] + [f"queue {q}" for q in queues if found[q] is None]


class DeadLetterSession(BlockingBroker):
    """Holds the dead-letter queue's messages without consuming them.

    One consumer, with a prefetch as large as the queue, receives the
    messages in queue order and acks only what the caller removes (after a
    confirmed republish, or a purge).  ``close`` cancels the consumer and
    returns everything else with a single ``nack(multiple, requeue)``.
    Verified on RabbitMQ 3.10 (quorum queue): a multiple nack re-enqueues in
    delivery-tag order, i.e. the old queue order, but *behind* anything
    still ready in the queue, which is why a session always takes the whole
    queue, including what arrives while it runs.  A session that dies (kill,
    network) loses nothing: the broker returns its unacked messages, though
    then not necessarily in their old order.
    """

    def __init__(self, url: str, heartbeat: int = 30, queue: str = DEAD_LETTER_QUEUE) -> None:
        super().__init__(url, heartbeat)
        self.queue = queue
        self._tag: str | None = None
        self._unacked: set[int] = set()

    def open(self) -> int:
        """Connect, take the lock and start receiving; returns the queue's depth."""
        self.connect()
        assert self._conn is not None
        try:
            try:
                self._conn.channel().queue_declare(DLQ_LOCK_QUEUE, exclusive=True, auto_delete=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 405:  # RESOURCE_LOCKED
                    raise DeadLetterQueueBusy(
                        "another `orders dlq` command is working on the dead-letter queue"
                    ) from None
                raise
            self._consume = self._conn.channel()
            depth = int(self._consume.queue_declare(self.queue, passive=True).method.message_count)
            # room for the whole queue plus what arrives meanwhile (see the class docstring)
            self._consume.basic_qos(prefetch_count=min(DLQ_MAX_HELD, depth + 10_000))
            self._tag = self._consume.basic_consume(self.queue, self._on_message)
        except _PIKA_ERRORS as exc:
            self.close()
            raise _lost(exc) from exc
        except DeadLetterQueueBusy:
            self.close()
            raise
        return depth

    def _on_message(self, _ch: Any, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        self._unacked.add(method.delivery_tag)
        self._buffer.append(_delivery(method, props, body, self.queue))

    def deliveries(self, limit: int) -> Iterable[Delivery]:
        """Up to ``limit`` messages in queue order, as the broker sends them."""
        assert self._conn is not None, "open() first"
        given, quiet_since = 0, time.monotonic()
        try:
            while given < limit:
                if self._buffer:
                    given += 1
                    quiet_since = time.monotonic()
                    yield self._buffer.pop(0)
                    continue
                if time.monotonic() - quiet_since > DLQ_IDLE_SECONDS:
                    return  # fewer than announced (taken by another client meanwhile)
                self._conn.process_data_events(time_limit=0.05)
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc

    def republish(self, message: Outgoing) -> None:
        """Publish with ``mandatory`` (an unroutable message is not confirmed) and wait for the confirm."""
        self.publish(message, mandatory=True)

    def remove(self, delivery: Delivery) -> None:
        """Ack: the message leaves the dead-letter queue."""
        assert self._consume is not None, "open() first"
        try:
            self._consume.basic_ack(delivery.delivery_tag)
        except _PIKA_ERRORS as exc:
            raise _lost(exc) from exc
        self._unacked.discard(delivery.delivery_tag)

    def close(self) -> None:
        """Return every message not removed, in queue order, and disconnect."""
        conn = self._conn
        if conn is not None and conn.is_open:
            try:
                if self._consume is not None and self._consume.is_open:
                    conn.process_data_events(time_limit=0)  # dispatch what is buffered, so it is returned in order
                    if self._tag is not None:
                        self._consume.basic_cancel(self._tag)
                    if self._unacked:
                        self._consume.basic_nack(max(self._unacked), multiple=True, requeue=True)
                    self._unacked.clear()
            except _PIKA_ERRORS:
                pass  # the broker returns whatever is unacked when the connection goes
        super().close()
