"""Dead letters as operators see them: why a message died, where it goes back to.

Two kinds reach ``orders.dead-letter``:

- dead-lettered by a worker (``worker.settlement.failure_headers``): headers
  ``x-original-*``, ``x-error-*``, ``x-attempts`` and the failure times;
- dead-lettered by RabbitMQ itself when a message exceeded the work queue's
  ``x-delivery-limit`` (a worker kept dying while holding it): RabbitMQ's
  ``x-death`` list instead.  A message that went through the delay tiers
  also carries ``x-death`` entries with reason ``expired``; those are
  history, not the cause.

A message can also reach the queue some other way (published to it by
hand, moved by a shovel) with neither: it has no failure time, and is
dated by its ``timestamp`` property when its publisher set one
(:attr:`DeadLetter.landed_at`); with no time at all, the age filters say so
rather than guess (:mod:`worker.dlq.operations`).

Nothing here talks to RabbitMQ or PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from schema.messages import ORDER_ID_NAMESPACE
from worker.rabbit.connection import Delivery

#: headers dropped on replay: the message gets a fresh round of retries
FAILURE_HEADERS = (
    "x-attempts",
    "orders-delay-tier",
    "x-first-failure-at",
    "x-last-failure-at",
    "x-error-class",
    "x-error-message",
    "x-error-digest",
    "x-error-traceback",
    "x-original-exchange",
    "x-original-routing-key",
    "x-original-queue",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)
#: RabbitMQ's dead-letter reasons that mean the broker, not a worker, dead-lettered it
BROKER_REASONS = {"delivery_limit": "DeliveryLimitExceeded", "rejected": "Rejected", "maxlen": "QueueFull"}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def _stamped(seconds: Any) -> datetime | None:
    """The AMQP ``timestamp`` property (seconds since the epoch) as a time; None when unset or absurd."""
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


@dataclass
class DeadLetter:
    """One message of the dead-letter queue, with the reason it is there."""

    id: str
    delivery: Delivery
    error_class: str
    error_message: str
    attempts: int
    original_exchange: str | None
    original_routing_key: str | None
    original_queue: str | None
    first_failure_at: datetime | None
    last_failure_at: datetime | None
    dead_lettered_by: str  # "worker" or "broker"

    @classmethod
    def from_delivery(cls, d: Delivery) -> DeadLetter:
        h = d.headers
        deaths = [x for x in (h.get("x-death") or []) if isinstance(x, dict)]
        # x-death is most recent first; a broker reason there means the broker dead-lettered it
        cause = deaths[0] if deaths and _text(deaths[0].get("reason")) in BROKER_REASONS else None
        if cause is not None:
            reason = _text(cause.get("reason")) or ""
            keys = cause.get("routing-keys") or []
            count = int(cause.get("count") or 1)
            return cls(
                id=message_key(d),
                delivery=d,
                error_class=BROKER_REASONS[reason],
                error_message=f"RabbitMQ dead-lettered it ({reason}) from {_text(cause.get('queue'))}"
                + (
                    " after too many redeliveries: a worker died or timed out while holding it"
                    if reason == "delivery_limit"
                    else ""
                ),
                attempts=int(h.get("x-attempts", 0)) + count,
                original_exchange=_text(h.get("x-original-exchange", cause.get("exchange"))),
                original_routing_key=_text(h.get("x-original-routing-key", keys[0] if keys else None)),
                original_queue=_text(h.get("x-original-queue", cause.get("queue"))),
                first_failure_at=_when(h.get("x-first-failure-at")) or _when(cause.get("time")),
                last_failure_at=_when(cause.get("time")),
                dead_lettered_by="broker",
            )
        return cls(
            id=message_key(d),
            delivery=d,
            error_class=_text(h.get("x-error-class")) or "Unknown",
            error_message=_text(h.get("x-error-message")) or "",
            attempts=int(h.get("x-attempts", 0)),
            original_exchange=_text(h.get("x-original-exchange")),
            original_routing_key=_text(h.get("x-original-routing-key")),
            original_queue=_text(h.get("x-original-queue")),
            first_failure_at=_when(h.get("x-first-failure-at")),
            last_failure_at=_when(h.get("x-last-failure-at")),
            dead_lettered_by="worker",
        )

    @property
    def landed_at(self) -> datetime | None:
        """When it landed here, as the age filters count: its last failure (else its first); for a
        message that reached the queue some other way, without failure headers, the ``timestamp``
        property its publisher set; None when it carries no time at all (see :attr:`dated_by`)."""
        return self.last_failure_at or self.first_failure_at or _stamped(self.delivery.timestamp)

    @property
    def dated_by(self) -> str | None:
        """What :attr:`landed_at` was read from: ``failure`` (the failure headers or RabbitMQ's
        ``x-death``), ``timestamp`` (the AMQP property), or None: nothing dates it."""
        if self.last_failure_at or self.first_failure_at:
            return "failure"
        return "timestamp" if _stamped(self.delivery.timestamp) else None

    @property
    def message_type(self) -> str:
        return self.delivery.message_type or "?"

    @property
    def error_pattern(self) -> str:
        return error_pattern(self.error_message)

    @property
    def group(self) -> str:
        """The group it belongs to (:func:`group_key`)."""
        return group_key(self.original_queue, self.error_class, self.error_pattern)

    @property
    def replay_count(self) -> int:
        """How often it was replayed before (``x-replay-count``): more than 0 is a repeated failure."""
        try:
            return int(self.delivery.headers.get("x-replay-count") or 0)
        except (TypeError, ValueError):
            return 0

    @property
    def destination(self) -> tuple[str, str] | None:
        """(exchange, routing key) it was consumed from, or None when unknown."""
        if self.original_exchange is None or self.original_routing_key is None:
            return None
        return self.original_exchange, self.original_routing_key

    def summary(self) -> dict[str, Any]:
        """The fields of ``dlq list``."""
        return {
            "id": self.id,
            "message_id": self.delivery.message_id,
            "type": self.delivery.message_type,
            "original_queue": self.original_queue,
            "original_exchange": self.original_exchange,
            "original_routing_key": self.original_routing_key,
            "error_class": self.error_class,
            "error_message": self.error_message,
            "attempts": self.attempts,
            "first_failure_at": _text(self.first_failure_at),
            "last_failure_at": _text(self.last_failure_at),
            "landed_at": _text(self.landed_at),
            "dated_by": self.dated_by,
            "dead_lettered_by": self.dead_lettered_by,
        }

    def full(self) -> dict[str, Any]:
        """Everything: summary, properties, headers and body (for show and export)."""
        d = self.delivery
        props = {k: v for k, v in d.properties().items() if k != "headers"}
        body: Any
        try:
            body = json.loads(d.body)
        except ValueError:
            body = None
        return {
            **self.summary(),
            "properties": props,
            "headers": jsonable(d.headers),
            "body": body,
            "body_text": d.body.decode("utf-8", "replace") if body is None else None,
            "body_base64": base64.b64encode(d.body).decode(),
            "error_digest": _text(d.headers.get("x-error-digest")),
            "traceback": _text(d.headers.get("x-error-traceback")),
        }


def order_id_of(dl: DeadLetter) -> str | None:
    """The body's ``order_id``; for a PlaceOrder without one, the id derived from its message_id."""
    try:
        body = json.loads(dl.delivery.body)
    except ValueError:
        body = None
    raw = body.get("order_id") if isinstance(body, dict) else None
    if raw:
        try:
            return str(uuid.UUID(str(raw)))
        except ValueError:
            return None
    if dl.delivery.message_type == "PlaceOrder" and dl.delivery.message_id:
        # the same derivation as schema.messages.PlaceOrder.resolved_order_id, which
        # needs a valid body; a dead-lettered body is often not one
        return str(uuid.uuid5(ORDER_ID_NAMESPACE, dl.delivery.message_id))
    return None


def message_key(d: Delivery) -> str:
    """The id operators use: the message_id, or a digest for a message without one."""
    if d.message_id:
        return d.message_id
    seed = (
        d.body
        + repr(
            sorted((k, str(v)) for k, v in d.headers.items() if k.startswith("x-") and k != "x-delivery-count")
        ).encode()
    )
    return "nomid-" + hashlib.sha256(seed).hexdigest()[:16]


def jsonable(value: Any) -> Any:
    """Header values (bytes, datetimes, nested tables) as JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, datetime)):
        return _text(value)
    return value


def replay_headers(d: Delivery, replayed_at: datetime, actor: str) -> dict[str, Any]:
    """Headers of a replayed message: failure history dropped (fresh retries), replay noted."""
    h = {k: v for k, v in d.headers.items() if k not in FAILURE_HEADERS}
    h["x-replayed-at"] = replayed_at.isoformat()
    h["x-replayed-by"] = actor
    h["x-replay-count"] = int(d.headers.get("x-replay-count", 0)) + 1
    return h


#: what :func:`error_pattern` masks, in this order: the parts of an error message that differ from one
#: message to the next while the failure is the same (ids, UUIDs, digests, numbers)
_MASKS = (
    (re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"), "<uuid>"),
    # provider ids: pi_3Nk…, ch_…, seti_…, the PayPal ids of 17 upper-case letters and digits
    (re.compile(r"\b[a-z]{2,8}_[A-Za-z0-9]{8,}\b"), "<id>"),
    (re.compile(r"\b(?=[A-Z0-9]*\d)[A-Z0-9]{12,}\b"), "<id>"),
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{12,}\b"), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
)


def error_pattern(message: str) -> str:
    """An error message with what varies masked: two dead letters that failed the same way match.

    ``unknown product sku-123 in order 1b4e28ba-2fa1-11d2-883f-0016d3cca427`` →
    ``unknown product sku-<n> in order <uuid>``.  Whitespace is folded and the
    result cut to 500 characters.
    """
    text = " ".join(message.split())
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return text[:500]


def group_key(original_queue: str | None, error_class: str, pattern: str) -> str:
    """The id of a group of dead letters: original queue, error class and :func:`error_pattern`."""
    seed = "\x00".join((original_queue or "", error_class, pattern)).encode()
    return hashlib.sha256(seed).hexdigest()[:24]


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def format_age(age: timedelta) -> str:
    """An age as :func:`parse_age` reads it, in the largest unit that says it exactly: ``90s``, ``15m``, ``3d``."""
    seconds = age.total_seconds()
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNIT[unit] == 0:
            return f"{int(seconds // _UNIT[unit])}{unit}"
    return f"{seconds:g}s"


def parse_age(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d``, ``1w`` as a timedelta."""
    m = _AGE.match(text)
    if not m:
        raise ValueError(f"not an age: {text!r} (say e.g. 30s, 15m, 2h, 3d)")
    return timedelta(seconds=float(m.group(1)) * _UNIT[m.group(2)])
