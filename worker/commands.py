"""Applying commands: decode → sender check → claim inbox → handlers → one commit.

:class:`Applier` runs a whole batch in one transaction, or one message in
its own (with a short in-place retry for transient database errors).  A
command its sender may not send (:mod:`handlers.senders`, the sender as the
broker vouched for it: :mod:`worker.identity`) claims no inbox row and
changes nothing: its refusal is announced (``command.refused``, reason
``unauthorized``, once per message) and it is dead-lettered.
:class:`BatchApplier` is how the command consumer applies a batch: the whole
batch at once; when that fails, one by one, so one bad message cannot hold
back the others; and through a database outage, wait instead of failing.
Nothing here talks to RabbitMQ: :mod:`worker.settlement` turns the results
into acks, replies, retries and dead letters.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from sqlalchemy import Engine
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from handlers import COMMAND_HANDLERS, Handler, apply_rank, events, order_id_of
from handlers.errors import Refused, RetryLater, Unauthorized
from handlers.outcome import MessageContext
from handlers.senders import OPEN, Sender
from schema.messages import MAX_MESSAGE_ID, Command, InvalidMessage
from schema.topology import COMMAND_TYPES, parse_command, wrong_queue
from worker import tracing
from worker.errors import Kind, classify
from worker.handled import Handled, Result, handled_from
from worker.identity import Identities
from worker.rabbit.connection import Delivery
from worker.reconnect import DatabaseHold
from worker.unit_of_work import PostgresUnitOfWork, Views, order_transaction

log = structlog.get_logger("worker.commands")

#: inbox consumer name of the command handlers
CONSUMER = "orders"
#: inbox consumer name of the refusals of unauthorized commands: one announcement per message, and the
#: message's own inbox row stays free for a replay once its sender may send it
UNAUTHORIZED_CONSUMER = "orders-unauthorized"

Decoded = tuple[Delivery, Command]


def check_envelope(delivery: Delivery, accepted: frozenset[str]) -> None:
    """The checks every delivery passes before its body is read; raises :class:`InvalidMessage`.

    A message is taken only from its own queue (``delivery.queue``, the queue
    it was consumed from): the routing key is the publisher's choice, so a
    PlaceOrder routed into ``orders.cancel`` is invalid, never placed.
    """
    if not delivery.message_id:
        raise InvalidMessage("message_id property is missing")
    if len(delivery.message_id) > MAX_MESSAGE_ID:
        raise InvalidMessage(f"message_id is longer than {MAX_MESSAGE_ID} characters")
    if delivery.content_type not in (None, "application/json"):
        raise InvalidMessage(f"content_type {delivery.content_type!r} is not application/json")
    if delivery.message_type not in accepted:
        raise InvalidMessage(f"unknown message type {delivery.message_type!r}")
    misplaced = wrong_queue(delivery.queue, delivery.message_type)
    if misplaced is not None:
        raise InvalidMessage(misplaced)


def decode(delivery: Delivery, accepted: frozenset[str] = COMMAND_TYPES) -> Command:
    """The command model of a delivery; raises :class:`InvalidMessage`."""
    check_envelope(delivery, accepted)
    return parse_command(delivery.message_type, delivery.body)


class Applier:
    def __init__(
        self,
        engine: Engine,
        inplace_retries: int = 3,
        views: Views | None = None,
        identities: Identities | None = None,
        handlers: dict[type[Command], Handler] = COMMAND_HANDLERS,
    ) -> None:
        self.engine = engine
        self.inplace_retries = inplace_retries
        self.views = views
        self.identities = identities or Identities(OPEN)
        self.handlers = handlers

    def decode_all(self, deliveries: Iterable[Delivery]) -> tuple[list[Decoded], list[Handled]]:
        good, bad = [], []
        for d in deliveries:
            try:
                good.append((d, decode(d)))
            except InvalidMessage as exc:
                bad.append(handled_from(d, exc))
        return good, bad

    def apply_batch(self, items: list[Decoded]) -> list[Handled]:
        """All of ``items`` in one transaction; raises when the transaction fails."""
        if not items:
            return []
        ordered: list[tuple[Delivery, Command, str, Sender]] = []
        refused: list[tuple[Delivery, Command, str, Unauthorized]] = []
        for d, c in sorted(items, key=lambda i: apply_rank(i[1])):
            sender = self.identities.sender(d)
            try:
                sender.check(c)
            except Unauthorized as exc:
                refused.append((d, c, order_id_of(c, d.message_id or ""), exc))
                continue
            ordered.append((d, c, order_id_of(c, d.message_id or ""), sender))
        handled: list[Handled] = []
        with order_transaction(self.engine, CONSUMER, self.views) as uow:
            if refused:
                handled += self._refuse_unauthorized(uow, refused)
            fresh = uow.claim(d.message_id or "" for d, _, _, _ in ordered)
            uow.preload(
                (order_id for _, _, order_id, _ in ordered),
                (line.product_id for _, c, _, _ in ordered if hasattr(c, "lines") for line in c.lines()),
            )
            deferred = []
            for d, command, order_id, sender in ordered:
                mid = d.message_id or ""
                if mid not in fresh:
                    handled.append(Handled(d, Result.DUPLICATE, order_id=order_id))
                    continue
                fresh.discard(mid)  # a second copy in this batch is a duplicate
                ctx = MessageContext(mid, d.message_type or "", d.correlation_id, order_id, sender)
                uow.handling(mid, ctx.message_type, d.correlation_id)
                with tracing.command_span(d, order_id):  # the events it emits store this span
                    try:
                        outcome = self.handlers[type(command)](command, ctx, uow)
                    except RetryLater as exc:
                        deferred.append(mid)
                        handled.append(handled_from(d, exc, order_id))
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
                        handled.append(handled_from(d, exc, order_id))
                        continue
                handled.append(Handled(d, Result.APPLIED, outcome, order_id=order_id))
            uow.release(deferred)
        return handled

    def _refuse_unauthorized(
        self, uow: PostgresUnitOfWork, refused: list[tuple[Delivery, Command, str, Unauthorized]]
    ) -> list[Handled]:
        """Announce each refusal once (an inbox row of its own), change nothing, dead-letter the command."""
        first = uow.claim((d.message_id or "" for d, _, _, _ in refused), UNAUTHORIZED_CONSUMER)
        handled = []
        for d, _, order_id, exc in refused:
            mid = d.message_id or ""
            log.warning(
                "command refused: sender not allowed",
                reason=str(exc),
                type=d.message_type,
                message_id=mid,
                order_id=order_id,
                user_id=d.user_id,
                correlation_id=d.correlation_id,
            )
            if mid in first:
                first.discard(mid)
                uow.order(order_id)  # loaded (and locked) so history is written only for an order that exists
                uow.handling(mid, d.message_type or "", d.correlation_id)
                events.refused(
                    uow, order_id, mid, d.message_type or "", exc.code, str(exc), d.correlation_id, unauthorized=True
                )
            handled.append(handled_from(d, exc, order_id))
        return handled

    def apply_one(self, delivery: Delivery, command: Command) -> Handled:
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
        except Exception as exc:  # noqa: BLE001 - sorted by handled_from, never lost
            return handled_from(delivery, exc)
        raise AssertionError("unreachable")


class BatchApplier:
    """The whole batch in one transaction; else one by one; through a database outage, wait."""

    def __init__(self, applier: Applier, hold: DatabaseHold) -> None:
        self.applier = applier
        self.hold = hold

    def decode_all(self, deliveries: Iterable[Delivery]) -> tuple[list[Decoded], list[Handled]]:
        """The commands of ``deliveries``, and what became of those that do not decode."""
        return self.applier.decode_all(deliveries)

    def apply(self, items: list[Decoded]) -> list[Handled]:
        while True:
            try:
                return self.applier.apply_batch(items)
            except Exception as exc:  # noqa: BLE001 - sorted by classify
                if classify(exc) is Kind.OUTAGE:
                    self.hold.wait(exc)
                    continue
                log.warning("batch failed, applying one by one", error=f"{type(exc).__name__}: {exc}", size=len(items))
                break
        return [self.one(d, command) for d, command in items]

    def one(self, d: Delivery, command: Command) -> Handled:
        h = self.applier.apply_one(d, command)
        while h.outage:
            self.hold.wait(h.error)  # type: ignore[arg-type]
            h = self.applier.apply_one(d, command)
        return h
