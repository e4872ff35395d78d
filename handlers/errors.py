"""Errors a handler raises, sorted by what the worker does with them.

    HandlerError
     ├── Refused        permanent: the command is answered and acked, no retry
     │    ├── NotFound          (someone else's order answers the same)
     │    ├── IllegalTransition
     │    │    └── NotCancellable   a cancel the order's state (or the sender) does not allow
     │    ├── Taken             a PlaceOrder names an order id already used
     │    └── Mismatch          payment amount / currency / id disagree
     ├── RetryLater     the order it names does not exist yet: delay queue
     ├── Unauthorized   its sender may not send it: dead-letter queue at once, announced
     └── ManualActionRequired   only a person can finish it: dead-letter queue

Infrastructure errors (database, broker) are not here: the worker sorts
those in ``worker.errors``.
"""

from __future__ import annotations


class HandlerError(Exception):
    code = "error"


class Refused(HandlerError):
    """Permanent: applying the command again would fail the same way."""

    code = "refused"


class NotFound(Refused):
    code = "not_found"


class IllegalTransition(Refused):
    code = "illegal_transition"


class NotCancellable(IllegalTransition):
    """A cancel of an order that can no longer be cancelled (shipped, ended, or paid and the sender no admin)."""

    code = "not_cancellable"


class Taken(Refused):
    """The order id is used by another order; nothing about that order is told."""

    code = "order_id_taken"


class Mismatch(Refused):
    code = "payment_mismatch"


class RetryLater(HandlerError):
    """The command arrived before what it depends on (e.g. its PlaceOrder)."""

    code = "retry_later"


class Unauthorized(HandlerError):
    """The broker user that sent the command may not send it (``handlers.senders``).

    Not a :class:`Refused`: the command is dead-lettered at once (an operator
    may replay it once the sender map allows it) and changes nothing, and its
    refusal is announced as ``command.refused`` with this code.
    """

    code = "unauthorized"


class ManualActionRequired(HandlerError):
    """The service cannot finish this itself (e.g. refund money it did not take):
    the message goes to the dead-letter queue with the reason, for an operator."""

    code = "manual_action_required"
