"""Running one payment step: prepare (transaction 1) → provider call (no transaction) → record (transaction 2).

The steps themselves (what to ask the provider, what its answer does to the
order) are :mod:`handlers.payment_step`; this module runs them against
PostgreSQL and the gateways, with the inbox row in the second transaction,
and turns whatever happens into a :class:`worker.outcomes.Handled`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog
from sqlalchemy import Engine, text
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from handlers import events
from handlers.errors import ManualActionRequired, Refused
from handlers.outcome import MessageContext, Outcome
from handlers.payment_step import CAPTURE_SETTLE_SECONDS, Call, Step, payment_steps, record_failure
from handlers.payments.base import PaymentGateway, PermanentPaymentError, TransientPaymentError
from schema.messages import InvalidMessage
from schema.topology import PAYMENT_STEP_TYPES
from worker import tracing
from worker.commands import decode
from worker.metrics import NO_METRICS, MetricsSink
from worker.outcomes import Handled, Result, handled_from
from worker.rabbit.connection import Delivery
from worker.unit_of_work import PostgresUnitOfWork, Views, order_transaction

log = structlog.get_logger("worker.steps")

#: inbox consumer name of the payment step
CONSUMER = "payments"


class PaymentStep:
    """Applies one internal payment command; never raises for the message's errors."""

    def __init__(
        self,
        engine: Engine,
        gateways: Mapping[str, PaymentGateway],
        inplace_retries: int = 3,
        views: Views | None = None,
        metrics: MetricsSink = NO_METRICS,
        capture_settle_seconds: float = CAPTURE_SETTLE_SECONDS,
    ) -> None:
        self.steps = payment_steps(capture_settle_seconds)
        self.engine = engine
        self.gateways = gateways
        self.inplace_retries = inplace_retries
        self.views = views
        self.metrics = metrics

    def handle(self, d: Delivery) -> Handled:
        with tracing.command_span(d) as span:  # a child of the internal command's traceparent
            handled = self._handle(d)
            tracing.outcome(span, handled.result.value, handled.error, handled.order_id)
        return handled

    def _handle(self, d: Delivery) -> Handled:
        try:
            command: Any = decode(d, PAYMENT_STEP_TYPES)  # an internal command: each names its order
        except InvalidMessage as exc:
            return handled_from(d, exc)
        ctx = MessageContext(d.message_id or "", d.message_type or "", d.correlation_id)
        order_id = str(command.order_id)
        with structlog.contextvars.bound_contextvars(
            message_id=d.message_id, order_id=order_id, correlation_id=d.correlation_id, step=ctx.message_type
        ):
            try:
                outcome = self._run(self.steps[type(command)], command, ctx)
            except ManualActionRequired as exc:
                log.error("payment step needs a person", reason=str(exc))
                return handled_from(d, exc, order_id)
            except Refused as exc:
                log.warning("payment step refused", reason=str(exc))
                try:
                    self._announce_refusal(ctx, order_id, exc)
                except Exception as failure:  # noqa: BLE001 - unannounced: not acked, tried again
                    return handled_from(d, failure, order_id)
                return handled_from(d, exc, order_id)
            except Exception as exc:  # noqa: BLE001 - RetryLater, transient or a bug: sorted by handled_from
                return handled_from(d, exc, order_id)
        if outcome is None:
            return Handled(d, Result.DUPLICATE, order_id=order_id)
        return Handled(d, Result.APPLIED, outcome, order_id=order_id)

    def _run(self, step: Step[Any], command: Any, ctx: MessageContext) -> Outcome | None:
        order_id = str(command.order_id)
        with order_transaction(self.engine, CONSUMER, self.views) as uow:  # transaction 1: record the attempt
            if _seen(uow, ctx.message_id):
                return None
            uow.handling(ctx.message_id, ctx.message_type, ctx.correlation_id)
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
                uow.handling(ctx.message_id, ctx.message_type, ctx.correlation_id)
                events.refused(uow, order_id, ctx.message_id, ctx.message_type, exc.code, str(exc), ctx.correlation_id)

    def _call(self, call: Call, ctx: MessageContext) -> Any:
        gateway = self.gateways[call.provider]
        try:
            # one span around the call and its retries; the SDKs' HTTP requests are spans under it
            with tracing.span(f"{call.provider} {ctx.message_type}", **{"orders.provider": call.provider}):
                for attempt in Retrying(
                    stop=stop_after_attempt(self.inplace_retries),
                    wait=wait_exponential(multiplier=0.2, max=2.0) + wait_random(0, 0.1),
                    retry=retry_if_exception_type(TransientPaymentError),
                    reraise=True,
                ):
                    with attempt:
                        result = call.run(gateway)
        except TransientPaymentError as exc:
            self.metrics.payment_call(call.provider, ctx.message_type, "transient_error")
            log.warning("payment provider unavailable; will retry", provider=call.provider, error=str(exc))
            raise
        except PermanentPaymentError:
            self.metrics.payment_call(call.provider, ctx.message_type, "permanent_error")
            raise
        self.metrics.payment_call(
            call.provider, ctx.message_type, getattr(getattr(result, "outcome", None), "value", "ok")
        )
        return result

    def _record(
        self, ctx: MessageContext, order_id: str, apply: Callable[[PostgresUnitOfWork], Outcome | None]
    ) -> Outcome | None:
        with order_transaction(
            self.engine, CONSUMER, self.views
        ) as uow:  # transaction 2: the answer, with the inbox row
            if not uow.claim([ctx.message_id]):
                return None
            uow.handling(ctx.message_id, ctx.message_type, ctx.correlation_id)
            uow.preload([order_id], [])
            outcome = apply(uow)
        return outcome or Outcome("unchanged", order_id)


def _seen(uow: PostgresUnitOfWork, message_id: str) -> bool:
    return (
        uow.conn.execute(
            text("SELECT 1 FROM inbox WHERE consumer = :c AND message_id = :m"), {"c": CONSUMER, "m": message_id}
        ).first()
        is not None
    )
