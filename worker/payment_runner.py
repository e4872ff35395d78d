"""Running payment commands: prepare (transaction 1) → provider calls (no transaction) → record (transaction 2).

What each command does (what to ask the provider, what its answer does to
the order) is its :class:`handlers.payment_commands.PaymentHandler`; this
module runs them against PostgreSQL and the gateways, a batch at a time, and
turns whatever happens into one :class:`worker.handled.Handled` per message:

1. one transaction prepares every step of the batch: the inbox says which
   were applied before (duplicates), every order is loaded and locked at
   once, each step records its attempt and says which call to make; the
   first deliveries of starts whose order waits for its first payment get
   their calls from one read instead, with nothing written
   (:meth:`PaymentRunner._first_starts`);
2. the provider calls run at the same time, in the call pool, with no
   transaction open, each with its idempotency key and its in-place retries;
3. one transaction records the answers, with the inbox rows: those in, and
   those that come within :data:`WAVE_LINGER_SECONDS`, a wave at a time, so
   a call that answers late (or is retried) holds up only itself.

So a batch of fifty steps costs a few transactions, not a hundred.  A
step that cannot go on (its order is not placed yet, it is refused, only a
person can finish it) is settled on its own without stopping the others
(handlers raise those before they change anything); a batch whose
transaction fails as a whole is run again one step at a time, so one bad
step cannot hold back the rest.  The provider's answers are kept across
that: a record run again never calls the provider again.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Engine
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from handlers import events
from handlers.errors import ManualActionRequired, Refused, RetryLater
from handlers.outcome import MessageContext, Outcome
from handlers.payment_commands import (
    CAPTURE_SETTLE_SECONDS,
    Call,
    PaymentHandler,
    first_start,
    payment_handlers,
    record_failure,
)
from handlers.payments.base import PaymentGateway, PermanentPaymentError, TransientPaymentError
from schema.messages import InvalidMessage
from schema.topology import PAYMENT_COMMAND_TYPES
from worker import tracing
from worker.commands import decode
from worker.handled import Handled, Result, handled_from
from worker.metrics import NO_METRICS, MetricsSink
from worker.rabbit.connection import Delivery
from worker.unit_of_work import PostgresUnitOfWork, Views, order_transaction, unstarted

log = structlog.get_logger("worker.payment_runner")

#: inbox consumer name of the payment step
CONSUMER = "payments"
#: how long, once a provider answer is in, the others of the batch are waited for to be recorded in the same
#: transaction: a slow call holds up only itself, the answers around it are recorded and acked meanwhile
WAVE_LINGER_SECONDS = 0.02


@dataclass
class _Work:
    """One payment step on its way through a batch."""

    delivery: Delivery
    command: Any
    handler: PaymentHandler[Any]
    ctx: MessageContext
    order_id: str
    span: tracing.StepSpan
    #: the message's first delivery (:func:`first_delivery`): no earlier one can have called for it
    first: bool = False
    call: Call | None = None
    #: the provider's answer, or its permanent refusal
    result: Any = None
    failure: PermanentPaymentError | None = None
    #: what became of the message, once it is settled here
    handled: Handled | None = None

    def done(self, h: Handled) -> None:
        self.handled = h


class _NoPool(Executor):
    """Runs each call at once, in the caller's thread (a step run on its own, and tests)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed back through the future, as a pool does
            f.set_exception(exc)
        return f


class PaymentRunner:
    """Applies internal payment commands a batch at a time; never raises for the messages' errors."""

    def __init__(
        self,
        engine: Engine,
        gateways: Mapping[str, PaymentGateway],
        inplace_retries: int = 3,
        views: Views | None = None,
        metrics: MetricsSink = NO_METRICS,
        capture_settle_seconds: float = CAPTURE_SETTLE_SECONDS,
        calls: Executor | None = None,
    ) -> None:
        self.handlers = payment_handlers(capture_settle_seconds)
        self.engine = engine
        self.gateways = gateways
        self.inplace_retries = inplace_retries
        self.views = views
        self.metrics = metrics
        #: where the provider calls of a batch run at the same time (the worker's call pool)
        self.calls: Executor = calls or _NoPool()
        #: single reads outside any transaction (no BEGIN or ROLLBACK around them)
        self._reads = engine.execution_options(isolation_level="AUTOCOMMIT")

    def handle(self, d: Delivery) -> Handled:
        return self.handle_batch([d])[0]

    def handle_batch(
        self, deliveries: Sequence[Delivery], report: Callable[[list[Handled]], None] | None = None
    ) -> list[Handled]:
        """Every delivery's outcome, in their order.  ``report`` is told each group of outcomes as soon as it
        is settled here (what was committed is committed), so a caller can ack those while a slow provider
        call of the same batch is still out."""
        works: list[_Work] = []
        handled: dict[int, Handled] = {}
        for i, d in enumerate(deliveries):
            try:
                command: Any = decode(d, PAYMENT_COMMAND_TYPES)  # an internal command: each names its order
            except InvalidMessage as exc:
                handled[i] = handled_from(d, exc)
                continue
            ctx = MessageContext(d.message_id or "", d.message_type or "", d.correlation_id)
            order_id = str(command.order_id)
            handler = self.handlers[type(command)]
            span = tracing.StepSpan(d, order_id)
            works.append(_Work(d, command, handler, ctx, order_id, span, first=first_delivery(d)))

        def settled(done: list[_Work]) -> None:
            for w in done:
                assert w.handled is not None
                w.span.end(w.handled.result.value, w.handled.error, w.order_id)
            if report is not None and done:
                report([w.handled for w in done])  # type: ignore[misc]

        if report is not None and handled:
            report(list(handled.values()))
        if works:
            self._run(works, settled)
        by_delivery = {id(w.delivery): w.handled for w in works}
        return [handled.get(i) or by_delivery[id(d)] for i, d in enumerate(deliveries)]  # type: ignore[misc]

    # -- the three phases ---------------------------------------------------------------------------

    def _run(self, works: list[_Work], settled: Callable[[list[_Work]], None]) -> None:
        try:
            self._prepare(works)
        except Exception as exc:  # noqa: BLE001 - the batch's transaction failed as a whole
            self._one_by_one(works, exc, self._prepare, "prepare")
        settled([w for w in works if w.handled is not None])
        pending = {self._submit(w): w for w in works if w.handled is None and w.call is not None}
        wave = [w for w in works if w.handled is None and w.call is None]  # recorded without a call
        while wave or pending:
            if pending:  # the answers in so far, and those coming within a moment: recorded together
                done, _ = wait(pending, timeout=None if not wave else 0, return_when=FIRST_COMPLETED)
                done |= wait(pending, timeout=WAVE_LINGER_SECONDS)[0] if len(done) < len(pending) else set()
                for future in done:
                    w = pending.pop(future)
                    self._answer(w, future)
                    if w.handled is None:
                        wave.append(w)
                    else:
                        settled([w])
            if wave:
                self._record_wave(wave)
                settled(wave)
                wave = []

    def _record_wave(self, ready: list[_Work]) -> None:
        try:
            self._record(ready)
        except Exception as exc:  # noqa: BLE001 - the batch's transaction failed as a whole
            self._one_by_one(ready, exc, self._record, "record")

    def _one_by_one(self, works: list[_Work], exc: Exception, phase: Callable[[list[_Work]], None], name: str) -> None:
        """A failed batch transaction: each step in a transaction of its own, so one cannot fail the others."""
        if len(works) > 1:
            log.warning(
                f"payment batch failed to {name}, one by one", error=f"{type(exc).__name__}: {exc}", size=len(works)
            )
        for w in works:  # what the failed transaction settled was rolled back with it: each runs again
            if len(works) > 1:
                try:
                    phase([w])
                    continue
                except Exception as one:  # noqa: BLE001 - sorted by handled_from, never lost
                    exc = one
            w.done(handled_from(w.delivery, exc, w.order_id))

    def _prepare(self, works: list[_Work]) -> None:
        """Transaction 1: the attempts recorded and the calls chosen, every order locked once; first starts
        of orders nothing was asked for yet without it (:meth:`_first_starts`)."""
        for w in works:  # a batch run again after a failed transaction starts afresh
            w.call, w.handled = None, None
        rest = self._first_starts(works)
        unrecorded: list[_Work] = []
        if rest:
            with order_transaction(self.engine, CONSUMER, self.views) as uow:
                before = uow.seen(w.ctx.message_id for w in rest)
                uow.preload((w.order_id for w in rest), ())
                for w in rest:
                    if w.ctx.message_id in before:
                        w.done(Handled(w.delivery, Result.DUPLICATE, order_id=w.order_id))
                        continue
                    before.add(w.ctx.message_id)  # a second copy in this batch is a duplicate: one call, not two
                    uow.handling(w.ctx.message_id, w.ctx.message_type, w.ctx.correlation_id)
                    first = w.handler.prepare_first if w.first else None
                    with w.span.within():
                        try:
                            w.call = (first or w.handler.prepare)(w.command, uow)
                        except (RetryLater, ManualActionRequired) as exc:
                            self._set_aside(w, exc)
                            continue
                        except Refused as exc:
                            self._refuse(uow, w, exc)
                            continue
                    if first is not None and w.call is None and uow.payment(w.order_id) is None:
                        unrecorded.append(w)
        for w in unrecorded:  # a first start of an order that ended before any money was asked for: settled
            # with no inbox row, so that a copy of it whose call is out (see first_delivery) still asks again
            w.done(Handled(w.delivery, Result.APPLIED, Outcome("unchanged", w.order_id), order_id=w.order_id))

    def _first_starts(self, works: list[_Work]) -> list[_Work]:
        """The first deliveries of starts whose order is ``pending`` with no payment get their calls from one
        read, with no transaction and nothing written (:func:`handlers.payment_commands.first_start`: the
        record writes the attempt with its answer); the others are returned, for the prepare transaction.

        About half of a paid order's prepare cost is saved so: the lock, the order's and the payment's
        writes, the view's outdating and a commit (figures: docs/benchmarks.md)."""
        firsts = {id(w) for w in works if w.handler.prepare_first is not None and w.first}
        if not firsts:
            return works
        with self._reads.connect() as conn:
            found = unstarted(conn, (w.order_id for w in works if id(w) in firsts))
        rest: list[_Work] = []
        taken: dict[str, str] = {}  # order id -> message id of its first start in this batch
        for w in works:
            fields = found.get(w.order_id) if id(w) in firsts else None
            if fields is None:
                rest.append(w)
            elif w.order_id not in taken:
                taken[w.order_id] = w.ctx.message_id
                w.call = first_start(w.order_id, *fields)
            elif taken[w.order_id] == w.ctx.message_id:  # a second copy in this batch: one call, not two
                w.done(Handled(w.delivery, Result.DUPLICATE, order_id=w.order_id))
            else:
                rest.append(w)  # another start of the same order: asked once more, under the same key
        return rest

    def _submit(self, w: _Work) -> Future[Any]:
        """The step's provider call, into the call pool (with the caller's context: logs, trace)."""
        return self.calls.submit(contextvars.copy_context().run, self._call, w)

    def _answer(self, w: _Work, future: Future[Any]) -> None:
        try:
            w.result = future.result()
        except PermanentPaymentError as exc:
            w.failure = exc
        except Exception as exc:  # noqa: BLE001 - transient after its retries, or a bug: delay tiers
            w.done(handled_from(w.delivery, exc, w.order_id))

    def _record(self, works: list[_Work]) -> None:
        """Transaction 2: the answers applied to the orders, with the inbox rows that make each step once."""
        for w in works:
            w.handled = None
        deferred: list[str] = []
        with order_transaction(self.engine, CONSUMER, self.views) as uow:
            fresh = uow.claim(w.ctx.message_id for w in works)
            uow.preload((w.order_id for w in works), ())
            for w in works:
                mid = w.ctx.message_id
                if mid not in fresh:
                    w.done(Handled(w.delivery, Result.DUPLICATE, order_id=w.order_id))
                    continue
                fresh.discard(mid)  # a second copy in this batch is a duplicate
                uow.handling(mid, w.ctx.message_type, w.ctx.correlation_id)
                with w.span.within():
                    try:
                        outcome = self._apply(w, uow)
                    except (RetryLater, ManualActionRequired) as exc:
                        deferred.append(mid)  # not applied: its inbox row goes, so it can come back
                        self._set_aside(w, exc)
                        continue
                    except Refused as exc:
                        self._refuse(uow, w, exc, claimed=True)
                        continue
                w.done(
                    Handled(
                        w.delivery, Result.APPLIED, outcome or Outcome("unchanged", w.order_id), order_id=w.order_id
                    )
                )
            uow.release(deferred)

    def _apply(self, w: _Work, uow: PostgresUnitOfWork) -> Outcome | None:
        if w.failure is not None:
            return record_failure(w.command, w.ctx, uow, w.failure)
        if w.call is None and w.handler.calls_provider:
            return None  # nothing was asked of the provider (answered before, or nothing open there)
        return w.handler.record(w.command, w.ctx, uow, w.result)

    # -- settling one step ------------------------------------------------------------------------

    def _set_aside(self, w: _Work, exc: RetryLater | ManualActionRequired) -> None:
        if isinstance(exc, ManualActionRequired):
            log.error("payment step needs a person", reason=str(exc), message_id=w.ctx.message_id, order_id=w.order_id)
        w.done(handled_from(w.delivery, exc, w.order_id))

    def _refuse(self, uow: PostgresUnitOfWork, w: _Work, exc: Refused, claimed: bool = False) -> None:
        """``command.refused`` with the inbox row, in the transaction at hand (a handler refuses before it
        changes anything)."""
        log.warning("payment step refused", reason=str(exc), message_id=w.ctx.message_id, order_id=w.order_id)
        if claimed or uow.claim([w.ctx.message_id]):
            events.refused(
                uow, w.order_id, w.ctx.message_id, w.ctx.message_type, exc.code, str(exc), w.ctx.correlation_id
            )
        w.done(handled_from(w.delivery, exc, w.order_id))

    # -- the provider ---------------------------------------------------------------------------------

    def _call(self, w: _Work) -> Any:
        call, ctx = w.call, w.ctx
        assert call is not None
        gateway = self.gateways[call.provider]
        try:
            # one span around the call and its retries, under the step's; the SDKs' HTTP requests under it
            with (
                w.span.within(),
                tracing.span(f"{call.provider} {ctx.message_type}", **{"orders.provider": call.provider}),
            ):
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


#: headers of a message that was delivered before or published again after a failure: the delay tiers'
#: retries (``x-attempts``), a replayed dead letter (``x-replay-count``), the broker's own dead-lettering
#: and a quorum queue's redeliveries
_AGAIN_HEADERS = ("x-attempts", "x-replay-count", "x-death", "x-delivery-count")


def first_delivery(d: Delivery) -> bool:
    """Whether this is the message's first delivery: no earlier one can have called a provider for it.

    A worker that dies during a call leaves the message unacknowledged, and the broker delivers it again
    marked ``redelivered``; a call that failed sends it through the delay tiers (``x-attempts``).  A second
    copy of the message (published twice) may come as a first delivery while the first copy's call is
    out: it finds nothing to do only when the order ended, and then records nothing (no inbox row), so the
    first copy, redelivered, still asks the provider what its call did."""
    if d.redelivered:
        return False
    headers = d.headers
    return not headers or not any(h in headers for h in _AGAIN_HEADERS)


def batches_of(deliveries: Iterable[Delivery], size: int) -> list[list[Delivery]]:
    """``deliveries`` in batches of at most ``size``."""
    items = list(deliveries)
    return [items[i : i + size] for i in range(0, len(items), size)]
