"""Declaring the contract's exchanges and queues (:mod:`schema.topology` names them), and checking them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from schema.topology import (
    COMMAND_QUEUES,
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELAY_EXCHANGE,
    DELAY_HEADER,
    DELIVERY_LIMIT,
    EXCHANGE_TYPES,
    EXCHANGES,
    INTERNAL_EXCHANGE,
    PAYMENT_ROUTING_KEYS,
    PAYMENTS_QUEUE,
    delay_queue,
)
from worker.errors import ConnectionLost
from worker.rabbit.connection import PIKA_ERRORS, connection_parameters, lost

_QUORUM = {
    "x-queue-type": "quorum",
    # at-least-once dead-lettering needs reject-publish (else it falls back to at-most-once)
    "x-overflow": "reject-publish",
    "x-dead-letter-strategy": "at-least-once",
}


def declare_topology(channel: BlockingChannel, delays: Iterable[int], group_size: int | None = None) -> None:
    """Declare every exchange, queue and binding; safe to repeat.

    ``group_size``: replicas of each new quorum queue (``x-quorum-initial-group-size``;
    RabbitMQ uses every node when the cluster has fewer).  A queue that exists
    already is left as it is: RabbitMQ refuses a declaration whose group size
    differs from the queue's, and the replicas of a running queue are changed
    with ``rabbitmq-queues grow`` / ``shrink``, not by declaring it.
    """
    replicas = {"x-quorum-initial-group-size": group_size} if group_size else {}
    try:
        for name, kind in EXCHANGE_TYPES.items():
            channel.exchange_declare(name, exchange_type=kind, durable=True)
        _declare_queue(channel, DEAD_LETTER_QUEUE, {"x-queue-type": "quorum", **replicas})
        channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
        work_args = {
            **_QUORUM,
            **replicas,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        }
        for queue, key in COMMAND_QUEUES.items():
            _declare_queue(channel, queue, work_args)
            channel.queue_bind(queue, COMMANDS_EXCHANGE, routing_key=key)
        _declare_queue(channel, PAYMENTS_QUEUE, work_args)
        for key in PAYMENT_ROUTING_KEYS:
            channel.queue_bind(PAYMENTS_QUEUE, INTERNAL_EXCHANGE, routing_key=key)
        for seconds in delays:
            # expired messages go back through the default exchange to the queue
            # named by their routing key: the queue they failed on
            queue = delay_queue(seconds)
            delay_args = {**_QUORUM, **replicas, "x-message-ttl": seconds * 1000, "x-dead-letter-exchange": ""}
            _declare_queue(channel, queue, delay_args)
            channel.queue_bind(queue, DELAY_EXCHANGE, arguments={"x-match": "all", DELAY_HEADER: f"{seconds}s"})
            # the binding of versions before 0.1 matched every message (x- headers are ignored)
            channel.queue_unbind(queue, DELAY_EXCHANGE, arguments={"x-match": "all", "x-delay-tier": f"{seconds}s"})
    except pika.exceptions.AMQPError as exc:
        raise ConnectionLost(f"declaring topology failed: {exc!r}") from exc


def _declare_queue(channel: BlockingChannel, name: str, arguments: dict[str, Any]) -> None:
    """Declare ``name`` unless it exists (looked at passively, on a channel of its own: a miss closes it)."""
    probe = channel.connection.channel()
    try:
        probe.queue_declare(name, passive=True)
        probe.close()
        return
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
    channel.queue_declare(name, durable=True, arguments=arguments)


def _passive_check(url: str, names: list[tuple[str, str]]) -> dict[str, tuple[int, int] | None]:
    """Passively declare ("exchange"|"queue", name) pairs; None where missing.

    A failed passive declare closes its channel, so a new one is opened after each.
    """
    found: dict[str, tuple[int, int] | None] = {}
    try:
        conn = pika.BlockingConnection(connection_parameters(url, 30))
    except PIKA_ERRORS as exc:
        raise lost(exc) from exc
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
    except PIKA_ERRORS as exc:
        raise lost(exc) from exc
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
