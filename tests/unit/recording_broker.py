"""A recording fake of the :class:`worker.rabbit.connection.BlockingBroker` surface the runtime core uses.

After dramatiq's ``StubBroker``: the settlement, the strategies (``Batches``,
``Window``) and the consumer's session run in process against it, and the
tests read what they did from its one log, in order: every publish (with
the broker's confirm, or the nack it was given), every ack (single or
``multiple``), every sleep.  It keeps the same book RabbitMQ keeps of a
channel's unacked deliveries, so ``unacked()`` says what would go back to
the queue if the connection closed now.

Time is a fake clock: ``sleep`` advances ``now`` and never waits, and
``on_sleep`` hooks let a test change the world while time passes (the
database comes back, a stop is asked for).  A guard in real time stops a
strategy that would spin for ever on a bug.  :class:`ScriptedHold` is the
real :class:`worker.reconnect.DatabaseHold` on that clock, with PostgreSQL's
answer to its probe scripted (away until a given time).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.errors import ConnectionLost, PublishNotConfirmed
from worker.rabbit.connection import Delivery, Outgoing
from worker.reconnect import DatabaseHold

#: real seconds a test may spend in the fake's sleeps before it is taken for a spin
SPIN_GUARD_SECONDS = 10.0


@dataclass
class Entry:
    """One thing done to the broker: ``publish``, ``nacked`` (a publish not confirmed), ``ack``, ``sleep``."""

    what: str
    tag: int | None = None
    multiple: bool = False
    message: Outgoing | None = None
    seconds: float = 0.0


def delivery(
    tag: int,
    message_type: str = "PlaceOrder",
    body: bytes = b"{}",
    *,
    message_id: str | None = None,
    queue: str = "orders.place",
    exchange: str = "orders.commands",
    routing_key: str = "order.place",
    headers: dict[str, Any] | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
) -> Delivery:
    """A delivery as :func:`worker.rabbit.connection.to_delivery` makes one."""
    return Delivery(
        delivery_tag=tag,
        exchange=exchange,
        routing_key=routing_key,
        queue=queue,
        body=body,
        message_id=f"m-{tag}" if message_id is None else message_id,
        message_type=message_type,
        correlation_id=correlation_id,
        reply_to=reply_to,
        content_type="application/json",
        headers=dict(headers or {}),
        redelivered=False,
        timestamp=1_700_000_000,
        app_id="tests",
    )


@dataclass
class RecordingBroker:
    """The ``BlockingBroker`` methods the core calls: publish, ack, ack_through, poll, sleep, cancel, close."""

    #: deliveries waiting in the queue, handed out by ``poll``
    incoming: deque[Delivery] = field(default_factory=deque)
    #: a publish for which this returns true is nacked (``PublishNotConfirmed``)
    refuse: Callable[[Outgoing], bool] = lambda message: False
    #: called after every fake sleep, with the broker (to change the world while time passes)
    on_sleep: list[Callable[[RecordingBroker], None]] = field(default_factory=list)
    #: called on every poll, before it hands anything out
    on_poll: list[Callable[[RecordingBroker], None]] = field(default_factory=list)
    log: list[Entry] = field(default_factory=list)
    now: float = 0.0
    lost: bool = False
    closed: bool = False
    _delivered: list[int] = field(default_factory=list)
    _acked: set[int] = field(default_factory=set)
    _started: float = field(default_factory=time.monotonic)

    # -- consuming

    def poll(self, max_messages: int, first_wait: float, fill_wait: float) -> list[Delivery]:
        for hook in list(self.on_poll):
            hook(self)
        self._check()
        self._guard()
        batch = [self.incoming.popleft() for _ in range(min(max_messages, len(self.incoming)))]
        self._delivered += [d.delivery_tag for d in batch]
        if not batch:
            self.now += first_wait
        return batch

    def cancel(self) -> list[Delivery]:
        """What a stop finds buffered: everything still in ``incoming`` (delivered before the cancel)."""
        self._check()
        rest = list(self.incoming)
        self.incoming.clear()
        self._delivered += [d.delivery_tag for d in rest]
        return rest

    def ack(self, delivery_tag: int) -> None:
        self._check()
        self._ack(delivery_tag, multiple=False)

    def ack_through(self, delivery_tag: int) -> None:
        self._check()
        self._ack(delivery_tag, multiple=True)

    def sleep(self, seconds: float) -> None:
        self._check()
        self._guard()
        self.log.append(Entry("sleep", seconds=seconds))
        self.now += seconds
        for hook in list(self.on_sleep):
            hook(self)
        time.sleep(0)  # let the pool's threads run: a real sleep would

    # -- publishing

    def publish(self, message: Outgoing, mandatory: bool = False) -> None:
        self._check()
        if self.refuse(message):
            self.log.append(Entry("nacked", message=message))
            raise PublishNotConfirmed(f"{message.exchange}/{message.routing_key}: NackError")
        self.log.append(Entry("publish", message=message))

    def close(self) -> None:
        self.closed = True

    # -- what happened

    def deliver(self, deliveries: Iterable[Delivery]) -> list[Delivery]:
        """Put these in the queue (``poll`` hands them out); returns them."""
        found = list(deliveries)
        self.incoming.extend(found)
        return found

    def taken(self, deliveries: Iterable[Delivery]) -> None:
        """Book deliveries a test hands to a strategy directly, as if ``poll`` had returned them."""
        self._delivered += [d.delivery_tag for d in deliveries]

    @property
    def published(self) -> list[Outgoing]:
        """Confirmed publishes, in order."""
        return [e.message for e in self.log if e.what == "publish" and e.message is not None]

    def published_to(self, exchange: str) -> list[Outgoing]:
        return [m for m in self.published if m.exchange == exchange]

    @property
    def acks(self) -> list[tuple[int, bool]]:
        """(delivery tag, multiple) of every ack, in order."""
        return [(e.tag, e.multiple) for e in self.log if e.what == "ack" and e.tag is not None]

    def acked(self) -> set[int]:
        """The delivery tags acked so far (a ``multiple`` ack counts every delivered tag up to it)."""
        return set(self._acked)

    def unacked(self) -> list[int]:
        """What would go back to the queue if the connection closed now."""
        return [t for t in self._delivered if t not in self._acked]

    @property
    def slept(self) -> float:
        return sum(e.seconds for e in self.log if e.what == "sleep")

    def order(self) -> list[str]:
        """The log as short words (``publish orders.delay/orders.place``, ``ack 3``, ``ack<= 5``), sleeps left out."""
        words = []
        for e in self.log:
            if e.what in ("publish", "nacked") and e.message is not None:
                words.append(f"{e.what} {e.message.exchange}/{e.message.routing_key}")
            elif e.what == "ack":
                words.append(f"ack{'<=' if e.multiple else ''} {e.tag}")
        return words

    def _ack(self, tag: int, multiple: bool) -> None:
        if tag not in self._delivered or tag in self._acked:
            raise AssertionError(f"ack of delivery tag {tag}, which is not delivered and unacked: a channel error")
        self.log.append(Entry("ack", tag=tag, multiple=multiple))
        self._acked |= {t for t in self._delivered if t <= tag} if multiple else {tag}

    def _guard(self) -> None:
        if time.monotonic() - self._started > SPIN_GUARD_SECONDS:
            raise AssertionError(f"spun for {SPIN_GUARD_SECONDS}s of real time in the fake broker's poll or sleep")

    def _check(self) -> None:
        if self.lost:
            raise ConnectionLost("StreamLostError: the recording broker's connection is gone")


class ScriptedHold(DatabaseHold):
    """The real :class:`DatabaseHold` (its waits, its logs, its stop), sleeping on the broker's fake
    clock, with PostgreSQL's answer scripted: away until ``back_at`` seconds on that clock (None: for good)."""

    def __init__(
        self,
        broker: RecordingBroker,
        stop: threading.Event,
        back_at: float | None = None,
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(engine=None, stop=stop, sleep=broker.sleep, tick=tick)  # type: ignore[arg-type]
        self.broker = broker
        self.back_at = back_at
        #: the broker's clock at every probe
        self.probes: list[float] = []

    def answers(self) -> bool:
        self.probes.append(self.broker.now)
        return self.back_at is not None and self.broker.now >= self.back_at
