"""Settling a handled message: the reply, a retry through the delay tiers, or a dead letter.

Every publish here is confirmed before the original is acked, so a kill at
any point loses nothing: an unconfirmed retry means an unacked original,
which the broker delivers again.

A retried or dead-lettered command is republished as the service's own
broker user and keeps its first sender in a header (:mod:`worker.identity`),
so a retry is judged as its sender's and a replayed dead letter too.
Replies go only to reply queues (:func:`reply_queue`): a ``reply_to`` naming
any other queue is ignored (the command is still applied), logged once and
counted, so a sender cannot make the worker write where it may not.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from datetime import UTC, datetime
from typing import Any

import structlog

from schema.messages import OutcomeResult
from schema.topology import DEAD_LETTER_EXCHANGE, DELAY_EXCHANGE, DELAY_HEADER
from worker.errors import ConnectionLost, PublishNotConfirmed
from worker.handled import Handled, Result
from worker.identity import Identities
from worker.metrics import NO_METRICS, MetricsSink
from worker.rabbit.connection import BlockingBroker, Delivery, Outgoing

log = structlog.get_logger("worker.settlement")


#: the queues replies may go to: RabbitMQ's direct reply-to, and server-named queues (a client cannot
#: declare an ``amq.`` name itself, so these are the exclusive queues RabbitMQ named for a client)
REPLY_QUEUE_PREFIXES = ("amq.rabbitmq.reply-to", "amq.gen-")
#: distinct ignored ``reply_to`` values logged per process (each once); beyond it they are only counted
IGNORED_REPLY_LOG_LIMIT = 1000


def reply_queue(reply_to: str) -> bool:
    """Whether ``reply_to`` names a reply queue the worker may answer in."""
    return reply_to.startswith(REPLY_QUEUE_PREFIXES)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def failure_headers(d: Delivery, error_class: str, message: str, tb: str | None) -> dict[str, Any]:
    """Headers of a retried or dead-lettered message: where it came from and why."""
    h = dict(d.headers)
    h.setdefault("x-original-exchange", d.exchange)
    h.setdefault("x-original-routing-key", d.routing_key)
    h.setdefault("x-original-queue", d.queue)
    h.setdefault("x-first-failure-at", now_iso())
    h["x-last-failure-at"] = now_iso()
    h["x-attempts"] = int(h.get("x-attempts", 0)) + 1
    h["x-error-class"] = error_class
    h["x-error-message"] = message[:1000]
    if tb:
        h["x-error-digest"] = hashlib.sha256(tb.encode()).hexdigest()[:16]
        h["x-error-traceback"] = tb[-2000:]
    return h


class Settlement:
    """After the commit: replies, retries through the delay tiers, dead letters (the ack is the caller's)."""

    def __init__(
        self, delays: tuple[int, ...], metrics: MetricsSink = NO_METRICS, identities: Identities | None = None
    ) -> None:
        self.delays = delays
        self.metrics = metrics
        self.identities = identities
        self._ignored_replies: set[str] = set()

    def settle(self, broker: BlockingBroker, h: Handled) -> None:
        d = h.delivery
        if h.result in (Result.APPLIED, Result.REFUSED, Result.DUPLICATE):
            if d.reply_to and self._may_reply(d):
                self._reply(broker, h)
            return
        if h.result is Result.INVALID:
            self._dead_letter(broker, d, type(h.error).__name__, h.reason or "invalid message", None)
            return
        # DEFERRED or FAILED: through the delay tiers, then the dead-letter queue
        tb = None
        if h.result is Result.FAILED and h.error is not None:
            tb = "".join(traceback.format_exception(h.error))
            log.warning("command failed", message_id=d.message_id, type=d.message_type, error=h.reason)
        error_class = type(h.error).__name__ if h.error else "Error"
        attempts = int(d.headers.get("x-attempts", 0))
        if attempts < len(self.delays):
            headers = failure_headers(d, error_class, h.reason or "", tb)
            headers[DELAY_HEADER] = f"{self.delays[attempts]}s"
            self._publish(broker, Outgoing(DELAY_EXCHANGE, d.queue, d.body, self._carry(d, headers)))
            self.metrics.retried(d.message_type)
        else:
            self._dead_letter(broker, d, error_class, h.reason or "failed", tb)

    def _dead_letter(self, broker: BlockingBroker, d: Delivery, error_class: str, message: str, tb: str | None) -> None:
        log.warning(
            "dead-lettering message",
            message_id=d.message_id,
            type=d.message_type,
            error_class=error_class,
            reason=message,
        )
        headers = failure_headers(d, error_class, message, tb)
        headers.pop(DELAY_HEADER, None)
        self._publish(broker, Outgoing(DEAD_LETTER_EXCHANGE, d.queue, d.body, self._carry(d, headers)))
        self.metrics.dead_lettered(d.message_type, error_class)

    def _carry(self, d: Delivery, headers: dict[str, Any]) -> dict[str, Any]:
        """The properties to republish ``d`` with: its own, these headers, its first sender kept."""
        properties = {**d.properties(), "headers": headers}
        return self.identities.carry(d, properties) if self.identities is not None else properties

    def _may_reply(self, d: Delivery) -> bool:
        reply_to = d.reply_to or ""
        if reply_queue(reply_to):
            return True
        self.metrics.reply_ignored()
        if reply_to not in self._ignored_replies and len(self._ignored_replies) < IGNORED_REPLY_LOG_LIMIT:
            self._ignored_replies.add(reply_to)
            log.warning(
                "reply_to is not a reply queue; no reply sent",
                reply_to=reply_to[:200],
                message_id=d.message_id,
                type=d.message_type,
                user_id=d.user_id,
            )
        return False

    def _publish(self, broker: BlockingBroker, message: Outgoing) -> None:
        try:
            broker.publish(message)
        except PublishNotConfirmed:
            # not acked: the broker redelivers the original, nothing is lost
            raise ConnectionLost("retry/dead-letter publish was not confirmed") from None

    def _reply(self, broker: BlockingBroker, h: Handled) -> None:
        d = h.delivery
        body = h.outcome.as_dict() if h.outcome else {"result": h.result.value, "order_id": h.order_id}
        if h.result is Result.DUPLICATE:
            body = {"result": OutcomeResult.DUPLICATE.value, "order_id": h.order_id}
        try:
            broker.publish(
                Outgoing(
                    "",
                    d.reply_to or "",
                    json.dumps(body).encode(),
                    {
                        "correlation_id": d.correlation_id or d.message_id,
                        "type": "CommandOutcome",
                        "delivery_mode": 1,
                    },
                )
            )
        except PublishNotConfirmed:
            pass  # the caller has gone; it can read the order instead
