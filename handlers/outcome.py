"""What applying a command came to: sent to ``reply_to`` and logged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from handlers.orders import Order
from handlers.senders import TRUSTED, Sender


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


@dataclass(frozen=True)
class Outcome:
    #: applied | rejected | refused | duplicate | unchanged
    result: str
    order_id: str | None = None
    status: str | None = None
    error: str | None = None
    message: str | None = None
    next_action: dict[str, str] | None = field(default=None)

    @classmethod
    def of(cls, result: str, order: Order, message: str | None = None) -> Outcome:
        return cls(
            result=result,
            order_id=order.order_id,
            status=order.status.value,
            message=message or order.reason,
            next_action=order.next_action,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
