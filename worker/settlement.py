"""Settling a handled message: the reply, a retry through the delay tiers, or a dead letter.

Every publish here is confirmed before the original is acked, so a kill at
any point loses nothing: an unconfirmed retry means an unacked original,
which the broker delivers again.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from datetime import UTC, datetime
from typing import Any

import structlog

from schema.topology import DEAD_LETTER_EXCHANGE, DELAY_EXCHANGE, DELAY_HEADER
from worker.errors import ConnectionLost, PublishNotConfirmed
from worker.metrics import NO_METRICS, MetricsSink
from worker.outcomes import Handled, Result
from worker.rabbit.connection import BlockingBroker, Delivery, Outgoing

log = structlog.get_logger("worker.settlement")


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

    def __init__(self, delays: tuple[int, ...], metrics: MetricsSink = NO_METRICS) -> None:
        self.delays = delays
        self.metrics = metrics

    def settle(self, broker: BlockingBroker, h: Handled) -> None:
        d = h.delivery
        if h.result in (Result.APPLIED, Result.REFUSED, Result.DUPLICATE):
            if d.reply_to:
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
            self._publish(broker, Outgoing(DELAY_EXCHANGE, d.queue, d.body, {**d.properties(), "headers": headers}))
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
        self._publish(broker, Outgoing(DEAD_LETTER_EXCHANGE, d.queue, d.body, {**d.properties(), "headers": headers}))
        self.metrics.dead_lettered(d.message_type, error_class)

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
            body = {"result": "duplicate", "order_id": h.order_id}
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
