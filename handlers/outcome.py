"""What applying a command came to: sent to ``reply_to`` and logged.

:class:`Outcome.result` is a :class:`~schema.messages.OutcomeResult` (``applied``, ``rejected``,
``refused``, ``duplicate``, ``unchanged``, ``settling``), the reply's vocabulary in the contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from handlers.orders import Order
from handlers.senders import TRUSTED, Sender
from schema.messages import OutcomeResult

__all__ = ["MessageContext", "Outcome", "OutcomeResult", "ResultName"]


@dataclass(frozen=True)
class MessageContext:
    """The AMQP facts of a command a handler may use."""

    message_id: str
    message_type: str
    correlation_id: str | None = None
    #: the order the command names, when the worker already worked it out
    order_id: str | None = None
    #: who sent it, as the broker vouched for it, and what it may do (``handlers.senders``)
    sender: Sender = TRUSTED


#: the results as strings, for the callers that still pass one (coerced to :class:`OutcomeResult`)
ResultName = Literal["applied", "rejected", "refused", "duplicate", "unchanged", "settling"]


@dataclass(frozen=True, init=False)
class Outcome:
    """What applying a command came to; :meth:`as_dict` is the reply's body (``schema.messages.CommandOutcome``)."""

    result: OutcomeResult
    order_id: str | None = None
    status: str | None = None
    #: a refusal's stable code
    error: str | None = None
    message: str | None = None
    next_action: dict[str, str] | None = field(default=None)

    def __init__(
        self,
        result: OutcomeResult | ResultName,
        order_id: str | None = None,
        status: str | None = None,
        error: str | None = None,
        message: str | None = None,
        next_action: dict[str, str] | None = None,
    ) -> None:
        # frozen: set once, here (as the generated __init__ of a frozen dataclass would); a string names a member
        put = object.__setattr__
        put(self, "result", result if isinstance(result, OutcomeResult) else OutcomeResult(result))
        put(self, "order_id", order_id)
        put(self, "status", status)
        put(self, "error", error)
        put(self, "message", message)
        put(self, "next_action", next_action)

    @classmethod
    def of(cls, result: OutcomeResult | ResultName, order: Order, message: str | None = None) -> Outcome:
        return cls(
            result=result,
            order_id=order.order_id,
            status=order.status.value,
            message=message or order.reason,
            next_action=order.next_action,
        )

    def as_dict(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        body["result"] = self.result.value
        return body
