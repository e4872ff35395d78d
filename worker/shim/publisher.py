"""Publishing commands from request handlers, under publisher confirms.

A 202 is only ever answered after the broker confirmed the command; any
broker failure (unreachable, connection lost, nack, no confirm within
``shim.publish_timeout_seconds``) becomes 503 with ``Retry-After``.
Publishing twice is harmless: the command's ``message_id`` is stable and the
worker's inbox applies it once, so a publish that met a dead connection is
repeated once on a fresh one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import structlog

from schema import messages
from schema.topology import route
from worker import tracing
from worker.errors import BrokerError, ConnectionLost
from worker.rabbit.connection import Outgoing
from worker.shim.amqp import AsyncChannel
from worker.shim.errors import ApiError
from worker.shim.metrics import ShimMetrics

log = structlog.get_logger("worker.shim.publisher")

#: what a 503 asks the client to wait before retrying (seconds)
RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class Envelope:
    """A command as the shim publishes it (exchange, routing key, AMQP properties, body); :meth:`on_route` fills
    exchange, routing key and type from the contract."""

    exchange: str
    routing_key: str
    message_type: str
    message_id: str
    body: dict[str, Any]
    correlation_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def on_route(
        cls, command: type[messages.Command], message_id: str, body: dict[str, Any], correlation_id: str | None = None
    ) -> Envelope:
        r = route(command)
        return cls(r.exchange, r.routing_key, r.message_type, message_id, body, correlation_id)

    def outgoing(self) -> Outgoing:
        return Outgoing(
            self.exchange,
            self.routing_key,
            json.dumps(self.body, separators=(",", ":")).encode(),
            {
                "message_id": self.message_id,
                "type": self.message_type,
                "correlation_id": self.correlation_id or self.message_id,
                "app_id": "orders-shim",
                "headers": self.headers or None,
            },
        )


def unavailable(message: str = "the message broker is unavailable; retry later") -> ApiError:
    return ApiError(503, "broker_unavailable", message, {"Retry-After": str(RETRY_AFTER_SECONDS)})


class CommandPublisher:
    """Confirmed publishes (and direct reply-to requests) on the process's :class:`AsyncChannel`."""

    def __init__(
        self, channel: AsyncChannel, timeout: float, metrics: ShimMetrics | None = None, user_id: str | None = None
    ) -> None:
        self._channel = channel
        self._timeout = timeout
        self._metrics = metrics
        #: the shim's broker user, set as every command's ``user_id``: RabbitMQ vouches for it, and the
        #: worker gives the shim's commands its rights (it authenticated the people behind them)
        self._user_id = user_id

    async def send(self, command: Envelope) -> None:
        """Publish and wait for the confirm; 503 ApiError otherwise."""
        await self._run(command, lambda out: self._channel.publish(out, self._timeout))

    async def request(self, command: Envelope, timeout: float) -> dict[str, Any] | None:
        """Publish, then wait up to ``timeout`` s for the worker's outcome (None: not in time)."""
        raw = await self._run(command, lambda out: self._channel.request(out, timeout))
        if raw is None:
            return None
        try:
            reply = json.loads(raw)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None

    def close(self) -> None:
        self._channel.close()

    async def ping(self) -> None:
        """Raise BrokerError unless the channel is open or can be opened (readiness)."""
        await self._channel.ping(self._timeout)

    async def _run(self, command: Envelope, work: Any) -> Any:
        with tracing.publish_span(
            command.exchange, command.routing_key, command.message_type, command.message_id
        ) as tp:
            outgoing = command.outgoing()
            if self._user_id is not None:
                outgoing.properties["user_id"] = self._user_id
            return await self._attempts(command, tracing.with_traceparent(outgoing, tp), work)

    async def _attempts(self, command: Envelope, outgoing: Outgoing, work: Any) -> Any:
        for attempt in (1, 2):
            try:
                result = await work(outgoing)
                self._count(command, "confirmed")
                return result
            except (ConnectionLost, TimeoutError) as exc:
                if attempt == 2 or isinstance(exc, TimeoutError):
                    return self._fail(command, exc)
            except BrokerError as exc:  # nacked or unroutable: repeating now would not help
                return self._fail(command, exc)
        return None  # pragma: no cover - the loop returns or raises

    def _fail(self, command: Envelope, exc: BaseException) -> Any:
        self._count(command, "failed")
        log.warning(
            "command not confirmed",
            type=command.message_type,
            message_id=command.message_id,
            error=str(exc) or type(exc).__name__,
        )
        raise unavailable() from None

    def _count(self, command: Envelope, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.published.labels(command.message_type, outcome).inc()
