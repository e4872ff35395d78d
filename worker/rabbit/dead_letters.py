"""The dead-letter queue held for an operator: one ``orders dlq`` session at a time."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import pika
import pika.exceptions
from pika.spec import Basic, BasicProperties

from schema.topology import DEAD_LETTER_QUEUE
from worker.errors import BrokerError
from worker.rabbit.connection import PIKA_ERRORS, BlockingBroker, Delivery, Outgoing, lost, to_delivery

#: an exclusive queue used as a lock: one ``orders dlq`` session at a time,
#: released by the broker when the holder's connection goes, even on SIGKILL
DLQ_LOCK_QUEUE = "orders.dead-letter.session"
#: seconds without a new delivery after which a session stops waiting for more
DLQ_IDLE_SECONDS = 2.0
#: unacked messages one session may hold (AMQP's prefetch count is 16 bits)
DLQ_MAX_HELD = 65535
#: seconds between two tries to take the lock while another session holds it
DLQ_LOCK_RETRY_SECONDS = 0.2


class DeadLetterQueueBusy(BrokerError):
    """Another ``orders dlq`` command holds the dead-letter queue."""


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

    def __init__(
        self, url: str, heartbeat: int = 30, queue: str = DEAD_LETTER_QUEUE, lock_wait_seconds: float = 0.0
    ) -> None:
        super().__init__(url, heartbeat)
        self.queue = queue
        #: how long to wait for another session to finish before :class:`DeadLetterQueueBusy`
        self.lock_wait_seconds = lock_wait_seconds
        self._tag: str | None = None
        self._unacked: set[int] = set()

    def open(self) -> int:
        """Connect, take the lock and start receiving; returns the queue's depth."""
        self.connect()
        assert self._conn is not None
        try:
            self._take_lock()
            self._consume = self._conn.channel()
            depth = int(self._consume.queue_declare(self.queue, passive=True).method.message_count)
            # room for the whole queue plus what arrives meanwhile (see the class docstring)
            self._consume.basic_qos(prefetch_count=min(DLQ_MAX_HELD, depth + 10_000))
            self._tag = self._consume.basic_consume(self.queue, self._on_message)
        except PIKA_ERRORS as exc:
            self.close()
            raise lost(exc) from exc
        except DeadLetterQueueBusy:
            self.close()
            raise
        return depth

    def _take_lock(self) -> None:
        """Declare the lock queue; while another session holds it, try again until ``lock_wait_seconds``."""
        assert self._conn is not None
        deadline = time.monotonic() + self.lock_wait_seconds
        while True:
            try:
                self._conn.channel().queue_declare(DLQ_LOCK_QUEUE, exclusive=True, auto_delete=True)
                return
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 405:  # 405 RESOURCE_LOCKED: another session holds it
                    raise
                if time.monotonic() >= deadline:
                    raise DeadLetterQueueBusy(
                        "another `orders dlq` command (or the console's index) is working on the dead-letter queue"
                    ) from None
            self._conn.sleep(DLQ_LOCK_RETRY_SECONDS)

    def _on_message(self, _ch: Any, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        self._unacked.add(method.delivery_tag)
        self._buffer.append(to_delivery(method, props, body, self.queue))

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
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc

    def republish(self, message: Outgoing) -> None:
        """Publish with ``mandatory`` (an unroutable message is not confirmed) and wait for the confirm."""
        self.publish(message, mandatory=True)

    def remove(self, delivery: Delivery) -> None:
        """Ack: the message leaves the dead-letter queue."""
        assert self._consume is not None, "open() first"
        try:
            self._consume.basic_ack(delivery.delivery_tag)
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc
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
            except PIKA_ERRORS:
                pass  # the broker returns whatever is unacked when the connection goes
        super().close()
