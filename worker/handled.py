"""What became of a message, and the one function that turns an exception into that.

Every path that applies a message (the command batch, one command on its
own, a payment step) ends in a :class:`Handled`; :mod:`worker.settlement`
turns it into an ack, a reply, a retry through the delay tiers or a dead
letter.  :func:`handled_from` is the only place that decides what an
exception means for its message.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from handlers.errors import ManualActionRequired, Refused, RetryLater, Unauthorized
from handlers.outcome import Outcome, OutcomeResult
from schema.messages import InvalidMessage
from worker.errors import Kind, classify
from worker.rabbit.connection import Delivery


class Result(enum.Enum):
    APPLIED = "applied"  # effects committed (includes an order ended `rejected`)
    REFUSED = "refused"  # permanent refusal, answered and announced, nothing changed
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

    @property
    def outage(self) -> bool:
        """Failed because a dependency (PostgreSQL) is away: hold it, do not spend a retry tier on it."""
        return self.result is Result.FAILED and self.error is not None and classify(self.error) is Kind.OUTAGE


def handled_from(delivery: Delivery, exc: BaseException, order_id: str | None = None) -> Handled:
    """What an exception raised while applying ``delivery`` means for it.

    - :class:`InvalidMessage`: it can never be applied (dead letter now);
    - :class:`RetryLater`: what it needs is not there yet (delay tiers);
    - :class:`ManualActionRequired`: only a person can finish it (dead letter, with the reason);
    - :class:`Unauthorized`: its sender may not send it (dead letter now; counted as refused, and the
      caller announces ``command.refused``);
    - :class:`Refused`: answered with the refusal (the caller announces ``command.refused``);
    - anything else: a failure, retried through the delay tiers, then dead-lettered.
    """
    reason = str(exc)
    if isinstance(exc, Unauthorized):
        outcome = Outcome(OutcomeResult.REFUSED, order_id, error=exc.code, message=reason)
        return Handled(delivery, Result.INVALID, outcome, error=exc, reason=reason, order_id=order_id)
    if isinstance(exc, InvalidMessage | ManualActionRequired):
        return Handled(delivery, Result.INVALID, error=exc, reason=reason, order_id=order_id)
    if isinstance(exc, RetryLater):
        return Handled(delivery, Result.DEFERRED, error=exc, reason=reason, order_id=order_id)
    if isinstance(exc, Refused):
        outcome = Outcome(OutcomeResult.REFUSED, order_id, error=exc.code, message=reason)
        return Handled(delivery, Result.REFUSED, outcome, error=exc, reason=reason, order_id=order_id)
    return Handled(delivery, Result.FAILED, error=exc, reason=f"{type(exc).__name__}: {exc}", order_id=order_id)
