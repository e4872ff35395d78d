"""The consume loop of one worker process: poll a batch, apply it, settle it.

Per batch: decode → apply in one transaction (or one by one when the batch
fails) → publish retries, dead letters and replies with confirms → one
``multiple`` ack.  Nothing is acked before its effects are committed or its
retry / dead letter is confirmed by the broker, so a kill at any instruction
loses nothing; the inbox makes the redelivery harmless.

Outage protection: when PostgreSQL is unreachable the consumer keeps the
batch it holds (unacked), stops taking more, probes the database with a
growing wait, and carries on when it answers, instead of cycling every
message through the retry tiers.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine, text

from worker.broker import (
    DEAD_LETTER_EXCHANGE,
    DELAY_EXCHANGE,
    DELAY_HEADER,
    BlockingBroker,
    Delivery,
    Outgoing,
    delay_queue,
)
from worker.errors import ConnectionLost, Kind, PublishNotConfirmed, StopRequested, classify
from worker.processing import Applier, Handled, Result, Views
from worker.settings import Settings

log = structlog.get_logger("worker.consumer")

#: longest wait between two probes of a dependency that is down (seconds)
MAX_PROBE_WAIT = 10.0
#: how often the liveness file is touched at most (seconds)
LIVENESS_INTERVAL = 1.0


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


class Backoff:
    """Growing wait that resets once things work again."""

    def __init__(self, first: float = 0.5, cap: float = MAX_PROBE_WAIT) -> None:
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        wait, self.current = self.current, min(self.current * 2, self.cap)
        return wait

    def reset(self) -> None:
        self.current = self.first


def wait_for_database(
    engine: Engine,
    broker: BlockingBroker,
    exc: BaseException,
    stop: threading.Event,
    tick: Callable[[], None] = lambda: None,
) -> None:
    """Outage protection: hold the work, probe with a growing wait, keep heartbeats flowing.

    Raises :class:`StopRequested` when asked to stop meanwhile: the held
    messages stay unacked and go back to the queue when the connection closes.
    """
    log.error("database unavailable, holding work until it is back", error=f"{type(exc).__name__}: {exc}")
    backoff = Backoff()
    while True:
        wait = backoff.next()
        while wait > 0:
            if stop.is_set():
                raise StopRequested("stopping while the database is unavailable")
            broker.sleep(min(wait, 0.25))
            wait -= 0.25
        tick()
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - still down
            continue
        log.info("database available again")
        return


class Settlement:
    """After the commit: replies, retries through the delay tiers, dead letters.

    Every publish here is confirmed before the original is acked.
    """

    def __init__(self, delays: tuple[int, ...], metrics: Any = None) -> None:
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
        delays = self.delays
        if attempts < len(delays):
            headers = failure_headers(d, error_class, h.reason or "", tb)
            headers[DELAY_HEADER] = f"{delays[attempts]}s"
            self._publish(broker, Outgoing(DELAY_EXCHANGE, d.queue, d.body, {**d.properties(), "headers": headers}))
            if self.metrics is not None:
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
        if self.metrics is not None:
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


class CommandConsumer:
    """Consumes the command queues of one worker process."""

    def __init__(
        self, settings: Settings, engine: Engine, queues: list[str], views: Views | None = None, metrics: Any = None
    ) -> None:
        self.settings = settings
        self.views = views
        self.cfg = settings.worker
        self.engine = engine
        self.queues = queues
        self.applier = Applier(engine, self.cfg.inplace_retries, views=views)
        self.metrics = metrics
        self.settlement = Settlement(self.cfg.retry_delays_seconds, metrics)
        self._liveness = Path(self.cfg.liveness_file) if self.cfg.liveness_file else None
        self._last_touch = 0.0
        self._broker: BlockingBroker | None = None
        self._stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; reconnects with backoff on broker loss."""
        self._stop = stop
        backoff = Backoff()
        state = "starting"
        while not stop.is_set():
            try:
                broker = self._broker = BlockingBroker(
                    self.settings.rabbitmq.url.get_secret_value(), self.settings.rabbitmq.heartbeat_seconds
                ).connect()
                broker.declare_topology(self.cfg.retry_delays_seconds)
                broker.consume(self.queues, self.cfg.prefetch)
            except ConnectionLost as exc:
                if state != "broker-down":
                    log.warning("broker unavailable, retrying", error=str(exc))
                    state = "broker-down"
                stop.wait(backoff.next())
                continue
            if state != "consuming":
                log.info("consuming", queues=self.queues)
                state = "consuming"
            backoff.reset()
            try:
                self._consume(broker, stop)
                self._drain(broker)
            except ConnectionLost as exc:
                # unacked messages go back to the queue; the inbox absorbs re-applies
                log.warning("broker connection lost", error=str(exc))
                state = "broker-down"
            except StopRequested:
                log.info("stopped during a database outage; held messages go back to the queue")
            finally:
                broker.close()

    def _consume(self, broker: BlockingBroker, stop: threading.Event) -> None:
        while not stop.is_set():
            batch = broker.poll(self.cfg.batch_size, first_wait=0.5, fill_wait=self.cfg.batch_wait_ms / 1000)
            self._touch_liveness()
            if batch:
                self.process(broker, batch, stop)
            elif self.views is not None:
                self.views.settle_owed()

    def _drain(self, broker: BlockingBroker) -> None:
        """On stop: cancel the consumers, finish what is held, ack it."""
        rest = broker.cancel()
        for start in range(0, len(rest), self.cfg.batch_size):
            self.process(broker, rest[start : start + self.cfg.batch_size], None)
        log.info("stopped consuming", finished=len(rest))

    def _touch_liveness(self) -> None:
        now = time.monotonic()
        if self._liveness is not None and now - self._last_touch >= LIVENESS_INTERVAL:
            self._last_touch = now
            try:
                self._liveness.touch()
            except OSError:
                pass

    # -- one batch ---------------------------------------------------------------

    def process(self, broker: BlockingBroker, batch: list[Delivery], stop: threading.Event | None) -> None:
        started = time.perf_counter()
        good, handled = self.applier.decode_all(batch)
        handled += self._apply(broker, good, stop)
        for h in handled:
            self.settlement.settle(broker, h)
        broker.ack_through(max(d.delivery_tag for d in batch))
        if self.metrics is not None:
            self.metrics.observe_batch(handled, time.perf_counter() - started)

    def _apply(
        self, broker: BlockingBroker, good: list[tuple[Delivery, Any]], stop: threading.Event | None
    ) -> list[Handled]:
        while True:
            try:
                return self.applier.apply_batch(good)
            except Exception as exc:  # noqa: BLE001 - sorted by classify
                if classify(exc) is Kind.OUTAGE:
                    self._wait_for_database(broker, exc)
                    continue
                log.warning("batch failed, applying one by one", error=f"{type(exc).__name__}: {exc}", size=len(good))
                break
        results = []
        for d, command in good:
            h = self.applier.apply_one(d, command)
            while h.result is Result.FAILED and h.error is not None and classify(h.error) is Kind.OUTAGE:
                self._wait_for_database(broker, h.error)
                h = self.applier.apply_one(d, command)
            results.append(h)
        return results

    def _wait_for_database(self, broker: BlockingBroker, exc: BaseException) -> None:
        wait_for_database(self.engine, broker, exc, self._stop, self._touch_liveness)


__all__ = ["CommandConsumer", "Settlement", "delay_queue", "failure_headers"]
