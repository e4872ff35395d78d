"""The payment consumer: runs the payment step beside the command consumer.

It has its own connection and thread (pika connections are not shared
between threads).  Provider calls run in a small thread pool while this
thread keeps pika's I/O loop turning, so a slow provider never costs the
connection its heartbeats.  Per message: prepare (transaction 1) → provider
call (no transaction) → record with the inbox row (transaction 2); the
delivery is acked only after that, or after its retry / dead letter was
confirmed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog
from sqlalchemy import Engine, text
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from handlers import events
from handlers.errors import ManualActionRequired, Refused, RetryLater
from handlers.outcome import MessageContext, Outcome
from handlers.payment_step import CAPTURE_SETTLE_SECONDS, payment_steps, record_failure
from handlers.payments.base import PaymentGateway, PermanentPaymentError, TransientPaymentError
from schema.messages import InvalidMessage, parse_command
from worker.broker import PAYMENTS_QUEUE, BlockingBroker, Delivery, wrong_queue
from worker.consumer import Backoff, Settlement, wait_for_database
from worker.errors import ConnectionLost, Kind, StopRequested, classify
from worker.processing import Handled, Result, Views, order_transaction
from worker.settings import Settings

log = structlog.get_logger("worker.payments")

#: inbox consumer name of the payment step
CONSUMER = "payments"


class PaymentStep:
    """Applies one internal payment command; never raises for the message's errors."""

    def __init__(
        self,
        engine: Engine,
        gateways: dict[str, PaymentGateway],
        inplace_retries: int = 3,
        views: Views | None = None,
        metrics: Any = None,
        capture_settle_seconds: float = CAPTURE_SETTLE_SECONDS,
    ) -> None:
        self.steps = payment_steps(capture_settle_seconds)
        self.engine = engine
        self.gateways = gateways
        self.inplace_retries = inplace_retries
        self.views = views
        self.metrics = metrics

    def handle(self, d: Delivery) -> Handled:
        try:
            if not d.message_id:
                raise InvalidMessage("message_id property is missing")
            step = self.steps.get(d.message_type or "")
            if step is None:
                raise InvalidMessage(f"unknown payment step {d.message_type!r}")
            misplaced = wrong_queue(d.queue, d.message_type)
            if misplaced is not None:
                raise InvalidMessage(misplaced)
            command: Any = parse_command(d.message_type, d.body)  # an internal command: each names its order
        except InvalidMessage as exc:
            return Handled(d, Result.INVALID, error=exc, reason=str(exc))
        ctx = MessageContext(d.message_id, d.message_type or "", d.correlation_id)
        order_id = str(command.order_id)
        with structlog.contextvars.bound_contextvars(
            message_id=d.message_id, order_id=order_id, correlation_id=d.correlation_id, step=ctx.message_type
        ):
            try:
                outcome = self._run(step, command, ctx)
            except RetryLater as exc:
                return Handled(d, Result.DEFERRED, error=exc, reason=str(exc), order_id=order_id)
            except ManualActionRequired as exc:
                log.error("payment step needs a person", reason=str(exc))
                return Handled(d, Result.INVALID, error=exc, reason=str(exc), order_id=order_id)
            except Refused as exc:
                log.warning("payment step refused", reason=str(exc))
                try:
                    self._announce_refusal(ctx, order_id, exc)
                except Exception as failure:  # noqa: BLE001 - unannounced: not acked, tried again
                    return Handled(
                        d,
                        Result.FAILED,
                        error=failure,
                        reason=f"{type(failure).__name__}: {failure}",
                        order_id=order_id,
                    )
                outcome = Outcome("refused", order_id, error=exc.code, message=str(exc))
                return Handled(d, Result.REFUSED, outcome, error=exc, reason=str(exc), order_id=order_id)
            except Exception as exc:  # noqa: BLE001 - transient or a bug: retry tiers
                return Handled(d, Result.FAILED, error=exc, reason=f"{type(exc).__name__}: {exc}", order_id=order_id)
        if outcome is None:
            return Handled(d, Result.DUPLICATE, order_id=order_id)
        return Handled(d, Result.APPLIED, outcome, order_id=order_id)

    def _run(self, step: Any, command: Any, ctx: MessageContext) -> Outcome | None:
        order_id = str(command.order_id)
        with order_transaction(self.engine, CONSUMER, self.views) as uow:  # transaction 1: record the attempt
            if uow.conn.execute(
                text("SELECT 1 FROM inbox WHERE consumer = :c AND message_id = :m"),
                {"c": CONSUMER, "m": ctx.message_id},
            ).first():
                return None
            call = step.prepare(command, uow)
        result: Any = None
        failure: PermanentPaymentError | None = None
        if call is not None:
            try:
                result = self._call(call, ctx)
            except PermanentPaymentError as exc:
                failure = exc
        elif step.calls_provider:
            return self._record(ctx, order_id, lambda uow: None)
        if failure is not None:
            return self._record(ctx, order_id, lambda uow: record_failure(command, ctx, uow, failure))
        return self._record(ctx, order_id, lambda uow: step.record(command, ctx, uow, result))

    def _announce_refusal(self, ctx: MessageContext, order_id: str, exc: Refused) -> None:
        """``command.refused`` with the inbox row, in a transaction of its own (the step's rolled back)."""
        with order_transaction(self.engine, CONSUMER, self.views) as uow:
            if uow.claim([ctx.message_id]):
                events.refused(uow, order_id, ctx.message_id, ctx.message_type, exc.code, str(exc), ctx.correlation_id)

    def _call(self, call: Any, ctx: MessageContext) -> Any:
        gateway = self.gateways[call.provider]
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self.inplace_retries),
                wait=wait_exponential(multiplier=0.2, max=2.0) + wait_random(0, 0.1),
                retry=retry_if_exception_type(TransientPaymentError),
                reraise=True,
            ):
                with attempt:
                    result = call.run(gateway)
        except TransientPaymentError as exc:
            self._count(call.provider, ctx.message_type, "transient_error")
            log.warning("payment provider unavailable; will retry", provider=call.provider, error=str(exc))
            raise
        except PermanentPaymentError:
            self._count(call.provider, ctx.message_type, "permanent_error")
            raise
        self._count(call.provider, ctx.message_type, getattr(getattr(result, "outcome", None), "value", "ok"))
        return result

    def _count(self, provider: str, step: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.payment_call(provider, step, outcome)

    def _record(self, ctx: MessageContext, order_id: str, apply: Callable[[Any], Outcome | None]) -> Outcome | None:
        with order_transaction(
            self.engine, CONSUMER, self.views
        ) as uow:  # transaction 2: the answer, with the inbox row
            if not uow.claim([ctx.message_id]):
                return None
            uow.preload([order_id], [])
            outcome = apply(uow)
        return outcome or Outcome("unchanged", order_id)


class PaymentConsumer:
    """Consumes ``orders.payments`` with up to ``payment_concurrency`` calls in flight.

    A sliding window, not batches: as soon as one call finishes it is
    settled and acked on its own, and the next delivery starts, so one slow
    provider call (a timeout, a retry in place) holds up only its own slot,
    never the other calls that finished meanwhile.
    """

    def __init__(self, settings: Settings, step: PaymentStep, metrics: Any = None) -> None:
        self.settings = settings
        self.step = step
        self.concurrency = settings.worker.payment_concurrency
        self.settlement = Settlement(settings.worker.retry_delays_seconds, metrics)
        self.metrics = metrics
        self._stop = threading.Event()

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        backoff = Backoff()
        down = False
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="payment") as pool:
            while not stop.is_set():
                try:
                    broker = BlockingBroker(
                        self.settings.rabbitmq.url.get_secret_value(), self.settings.rabbitmq.heartbeat_seconds
                    ).connect()
                    broker.consume([PAYMENTS_QUEUE], self.concurrency)
                except ConnectionLost as exc:
                    if not down:
                        log.warning("payment consumer: broker unavailable", error=str(exc))
                        down = True
                    stop.wait(backoff.next())
                    continue
                down = False
                backoff.reset()
                in_flight: dict[Future[Handled], Delivery] = {}
                try:
                    while not stop.is_set():
                        room = self.concurrency - len(in_flight)
                        if room:
                            for d in broker.poll(room, first_wait=0.02 if in_flight else 0.5, fill_wait=0.002):
                                in_flight[pool.submit(self.step.handle, d)] = d
                        else:
                            broker.sleep(0.02)  # heartbeats keep flowing while providers answer
                        self._settle_done(broker, pool, in_flight)
                    for d in broker.cancel():  # delivered before the cancel: finish them too
                        in_flight[pool.submit(self.step.handle, d)] = d
                    while in_flight:
                        broker.sleep(0.02)
                        self._settle_done(broker, pool, in_flight)
                except ConnectionLost as exc:
                    log.warning("payment consumer: connection lost", error=str(exc))
                    # calls under way finish before the redeliveries start; theirs are not acked and come back
                    wait_all(in_flight)
                    stop.wait(backoff.next())
                except StopRequested:
                    log.info("payment consumer stopped during a database outage")
                    wait_all(in_flight)
                finally:
                    broker.close()

    def _settle_done(
        self, broker: BlockingBroker, pool: ThreadPoolExecutor, in_flight: dict[Future[Handled], Delivery]
    ) -> None:
        done = [f for f in in_flight if f.done()]
        outage: list[Handled] = []
        for future in done:
            del in_flight[future]
            h = future.result()
            if h.result is Result.FAILED and h.error is not None and classify(h.error) is Kind.OUTAGE:
                outage.append(h)
            else:
                self._settle(broker, h)
        if not outage:
            return
        if self._database_answers():
            # a call that started before an outage that is over now: an ordinary failure (delay tiers)
            for h in outage:
                self._settle(broker, h)
            return
        # hold the work until the database is back (logged once, not once per call), then run it again
        wait_for_database(self.step.engine, broker, outage[0].error, self._stop)  # type: ignore[arg-type]
        for h in outage:
            in_flight[pool.submit(self.step.handle, h.delivery)] = h.delivery

    def _settle(self, broker: BlockingBroker, h: Handled) -> None:
        self.settlement.settle(broker, h)
        broker.ack(h.delivery.delivery_tag)
        if self.metrics is not None:
            self.metrics.count([h])

    def _database_answers(self) -> bool:
        try:
            with self.step.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure: still away
            return False


def wait_all(in_flight: dict[Future[Handled], Delivery]) -> None:
    """Let the calls under way finish (unsettled: their deliveries were not acked)."""
    for future in in_flight:
        future.exception()
    in_flight.clear()


__all__ = ["PaymentConsumer", "PaymentStep"]
