"""Shapes of the provider events we read, checked before anything is taken from them.

A webhook that verifies is the provider's (or someone holding its key), but
its JSON may still not be what the translation expects: a string where an
object belongs, a list for ``metadata``, a 300-character event id (which would
overflow the AMQP ``message_id`` when published).  Each gateway describes the
fields it reads with these pydantic models (unknown fields ignored, no type
coercion) and :func:`read` turns a mismatch into :class:`MalformedWebhook`,
which the shim answers with 400 ``invalid_webhook``.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from handlers.payments.base import MalformedWebhook
from schema.messages import MAX_MESSAGE_ID, describe_validation_error

#: a provider event id: it becomes the command's AMQP message_id
EventId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MESSAGE_ID)]
#: an id we carry into a command (our order id, the provider's payment id)
Ref = Annotated[str, StringConstraints(max_length=MAX_MESSAGE_ID)]
#: an amount in minor units that cannot be negative (what was refunded)
NonNegativeInt = Annotated[int, Field(ge=0)]


class Shape(BaseModel):
    """The fields of a provider object we read; the rest is ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


_S = TypeVar("_S", bound=Shape)


def read(model: type[_S], data: Any, what: str) -> _S:
    """``data`` as ``model``; :class:`MalformedWebhook` naming the fields that do not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MalformedWebhook(f"{what}: {describe_validation_error(exc)}") from None


__all__ = ["EventId", "NonNegativeInt", "Ref", "Shape", "read"]
