"""Applying commands: decode → claim inbox → handlers → one commit.

``Applier.apply_batch`` runs a whole batch in one transaction; when that
fails, ``apply_one`` runs each message in its own transaction (with a short
in-place retry for transient database errors), so one bad message cannot hold
back the others.  Nothing here talks to RabbitMQ: the consumer turns the
results into acks, replies, retries and dead letters.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from sqlalchemy import Engine
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from handlers import APPLY_ORDER, COMMAND_HANDLERS, events, order_id_of
from handlers.errors import Refused, RetryLater
from handlers.outcome import MessageContext, Outcome
from schema.messages import MAX_MESSAGE_ID, InvalidMessage, parse_command
from worker.broker import Delivery, wrong_queue
from worker.errors import Kind, classify
from worker.unit_of_work import PostgresUnitOfWork

log = structlog.get_logger("worker.processing")

#: inbox consumer name of the command handlers
CONSUMER = "orders"


class Result(enum.Enum):
    APPLIED = "applied"  # effects committed (includes an order ended `rejected`)
    REFUSED = "refused"  # permanent refusal, answered, nothing changed
    DUPLICATE = "duplicate"  # message_id already applied
    DEFERRED = "deferred"  # depends on something not there yet: delay queue
    INVALID = "invalid"  # can never be applied: dead-letter now
    FAILED = "failed"  # an error: retry tiers, then dead-letter


@dataclass
class Handled:
    delivery: Delivery
    result: Result
    outcome: Outcome | None = None
    error: BaseException | None = None
    reason: str | None = None
    order_id: str | None = None


def decode(delivery: Delivery) -> Any:
    """The command model of a delivery; raises :class:`InvalidMessage`.

    A command is taken only from its own queue (``delivery.queue``, the queue
    it was consumed from): the routing key is the publisher's choice, so a
    PlaceOrder routed into ``orders.cancel`` is invalid, never placed.
    """
    if not delivery.message_id:
        raise InvalidMessage("message_id property is missing")
    if len(delivery.message_id) > MAX_MESSAGE_ID:
        raise InvalidMessage(f"message_id is longer than {MAX_MESSAGE_ID} characters")
    if delivery.content_type not in (None, "application/json"):
        raise InvalidMessage(f"content_type {delivery.content_type!r} is not application/json")
    if delivery.message_type not in COMMAND_HANDLERS:
        raise InvalidMessage(f"unknown message type {delivery.message_type!r}")
    misplaced = wrong_queue(delivery.queue, delivery.message_type)
    if misplaced is not None:
        raise InvalidMessage(misplaced)
    return parse_command(delivery.message_type, delivery.body)


class Views(Protocol):
    """The read model as the transactions that change orders keep it (:class:`worker.read_model.OrderCache`)."""

    def outdate(self, versions: dict[str, int]) -> None:
        """Before the commit: the cached views of these orders are outdated."""

    def refresh(self, order_ids: Iterable[str]) -> None:
        """After the commit: write the new views through."""

    def settle_owed(self) -> None:
        """When idle: the refreshes that could not be made before."""


@contextmanager
def order_transaction(engine: Engine, consumer: str, views: Views | None) -> Iterator[PostgresUnitOfWork]:
    """One transaction that changes orders, as a unit of work that the body fills.

    On a normal exit: flush, mark the changed orders' views outdated, commit,
    then refresh those views.  On an exception: roll back, and nothing else.
    """
    with engine.begin() as conn:
        uow = PostgresUnitOfWork(conn, consumer)
        yield uow
        uow.flush()
        touched = uow.touched_versions
        if views is not None and touched:
            views.outdate(touched)  # before the commit: a process killed after it leaves no stale view
    if views is not None and touched:
        views.refresh(touched)


class Applier:
    def __init__(self, engine: Engine, inplace_retries: int = 3, views: Views | None = None) -> None:
        self.engine = engine
        self.inplace_retries = inplace_retries
        self.views = views

    def decode_all(self, deliveries: list[Delivery]) -> tuple[list[tuple[Delivery, Any]], list[Handled]]:
        good, bad = [], []
        for d in deliveries:
            try:
                good.append((d, decode(d)))
            except InvalidMessage as exc:
                bad.append(Handled(d, Result.INVALID, error=exc, reason=str(exc)))
        return good, bad

    def apply_batch(self, items: list[tuple[Delivery, Any]]) -> list[Handled]:
        """All of ``items`` in one transaction; raises when the transaction fails."""
        if not items:
            return []
        ordered = [
            (d, c, order_id_of(c, d.message_id))  # type: ignore[arg-type]
            for d, c in sorted(items, key=lambda it: APPLY_ORDER.get(it[0].message_type or "", 9))
        ]
        handled: list[Handled] = []
        with order_transaction(self.engine, CONSUMER, self.views) as uow:
            fresh = uow.claim(d.message_id for d, _, _ in ordered)  # type: ignore[misc]
            uow.preload(
                (order_id for _, _, order_id in ordered),
                (line.product_id for _, c, _ in ordered if hasattr(c, "lines") for line in c.lines()),
            )
            deferred = []
            for d, command, order_id in ordered:
                mid: str = d.message_id  # type: ignore[assignment]
                if mid not in fresh:
                    handled.append(Handled(d, Result.DUPLICATE, order_id=order_id))
                    continue
                fresh.discard(mid)  # a second copy in this batch is a duplicate
                ctx = MessageContext(mid, d.message_type or "", d.correlation_id, order_id)
                try:
                    outcome = COMMAND_HANDLERS[ctx.message_type](command, ctx, uow)
                except RetryLater as exc:
                    deferred.append(mid)
                    handled.append(Handled(d, Result.DEFERRED, error=exc, reason=str(exc), order_id=order_id))
                    continue
                except Refused as exc:
                    log.info(
                        "command refused",
                        reason=str(exc),
                        type=ctx.message_type,
                        message_id=mid,
                        order_id=order_id,
                        correlation_id=d.correlation_id,
                    )
                    # never silent: announced in this transaction, with the inbox row that makes it once
                    events.refused(uow, order_id, mid, ctx.message_type, exc.code, str(exc), d.correlation_id)
                    handled.append(
                        Handled(
                            d,
                            Result.REFUSED,
                            Outcome("refused", order_id, error=exc.code, message=str(exc)),
                            error=exc,
                            reason=str(exc),
                            order_id=order_id,
                        )
                    )
                    continue
                handled.append(Handled(d, Result.APPLIED, outcome, order_id=order_id))
            uow.release(deferred)
        return handled

    def apply_one(self, delivery: Delivery, command: Any) -> Handled:
        """One message in its own transaction; never raises for the message's errors."""
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self.inplace_retries),
                wait=wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
                retry=retry_if_exception(lambda e: classify(e) is Kind.TRANSIENT),
                reraise=True,
            ):
                with attempt:
                    return self.apply_batch([(delivery, command)])[0]
        except Exception as exc:  # noqa: BLE001 - sorted below, never lost
            return Handled(delivery, Result.FAILED, error=exc, reason=f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")
