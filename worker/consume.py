"""The one consume loop, and the two ways of working through what it takes.

:class:`Consumer` connects (through :func:`worker.reconnect.keep_running`),
takes deliveries from its queues as fast as its :class:`Strategy` has room,
touches the liveness file, and on stop cancels its consumers, hands the
strategy what was delivered meanwhile and lets it finish (``join``) before
the connection closes.  The strategies, after arroyo's
``submit``/``poll``/``join`` ones:

- :class:`Batches` (commands): a batch applied in one transaction by
  :class:`worker.commands.BatchApplier`, settled, then acked with one
  ``multiple`` ack;
- :class:`Window` (payment steps): batches of steps in a thread pool, each
  batch two transactions and its provider calls at the same time
  (:mod:`worker.payment_runner`), up to N steps in flight, each step settled and acked
  as soon as its batch has recorded it, so a slow provider call holds up only its
  own message (steps settled in a row share one ``multiple`` ack).

Nothing is acked before its effects are committed or its retry / dead
letter is confirmed by the broker, so a kill at any instruction loses
nothing; the inbox makes the redelivery harmless.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import structlog

from worker import tracing
from worker.commands import BatchApplier
from worker.errors import ConnectionLost
from worker.handled import Handled, handled_from
from worker.metrics import NO_METRICS, MetricsSink
from worker.payment_runner import PaymentRunner, batches_of
from worker.rabbit.connection import BlockingBroker, Delivery
from worker.rabbit.topology import declare_topology
from worker.reconnect import DatabaseHold, keep_running
from worker.settings import Settings
from worker.settlement import Settlement

log = structlog.get_logger("worker.consume")

#: how often the liveness file is touched at most (seconds)
LIVENESS_INTERVAL = 1.0


class Strategy(Protocol):
    """How a consumer works through its deliveries."""

    @property
    def first_wait(self) -> float:
        """Seconds a poll waits for the first delivery."""

    @property
    def fill_wait(self) -> float:
        """Seconds a poll waits for each further delivery of a batch."""

    def room(self) -> int:
        """How many deliveries it can take now (0: none, keep the I/O loop turning)."""

    def submit(self, broker: BlockingBroker, deliveries: list[Delivery]) -> None:
        """Take these deliveries (at most ``room()``)."""

    def poll(self, broker: BlockingBroker) -> None:
        """Settle and ack what has finished."""

    def join(self, broker: BlockingBroker) -> None:
        """Finish, settle and ack everything taken (on stop)."""

    def abandon(self) -> None:
        """The connection is gone: let work under way end, settle nothing (it comes back unacked)."""


class Consumer:
    """Consumes ``queues`` with a :class:`Strategy`, reconnecting for as long as it runs."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        queues: list[str],
        prefetch: int,
        strategy: Callable[[BlockingBroker, threading.Event, Callable[[], None]], Strategy],
        declare: bool = False,
        liveness_file: str | None = None,
        idle: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.queues = queues
        self.prefetch = prefetch
        self.make_strategy = strategy
        self.declare = declare
        self.idle = idle
        self._liveness = Path(liveness_file) if liveness_file else None
        self._last_touch = 0.0

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set."""
        keep_running(self.name, lambda: self._open(stop), stop)

    def _open(self, stop: threading.Event) -> _Session:
        rabbitmq = self.settings.rabbitmq
        broker = BlockingBroker(rabbitmq.url.get_secret_value(), rabbitmq.heartbeat_seconds).connect()
        try:
            if self.declare:
                declare_topology(
                    broker.channel(),
                    self.settings.worker.retry_delays_seconds,
                    self.settings.rabbitmq.quorum_group_size,
                )
            broker.consume(self.queues, self.prefetch)
        except ConnectionLost:
            broker.close()
            raise
        log.info("consuming", queues=self.queues)
        return _Session(self, broker, self.make_strategy(broker, stop, self.touch_liveness))

    def touch_liveness(self) -> None:
        now = time.monotonic()
        if self._liveness is not None and now - self._last_touch >= LIVENESS_INTERVAL:
            self._last_touch = now
            try:
                self._liveness.touch()
            except OSError:
                pass


class _Session:
    def __init__(self, consumer: Consumer, broker: BlockingBroker, strategy: Strategy) -> None:
        self.consumer, self.broker, self.strategy = consumer, broker, strategy

    def run(self, stop: threading.Event) -> None:
        broker, strategy, consumer = self.broker, self.strategy, self.consumer
        try:
            while not stop.is_set():
                room = strategy.room()
                if room:
                    batch = broker.poll(room, strategy.first_wait, strategy.fill_wait)
                else:
                    batch = []
                    broker.sleep(0.02)  # heartbeats keep flowing while the work runs
                consumer.touch_liveness()
                if batch:
                    strategy.submit(broker, batch)
                elif room and consumer.idle is not None:
                    consumer.idle()
                strategy.poll(broker)
            rest = broker.cancel()  # delivered before the cancel: finish them too
            while rest:
                take = strategy.room()
                if take:
                    strategy.submit(broker, rest[:take])
                    rest = rest[take:]
                else:
                    broker.sleep(0.02)
                strategy.poll(broker)
            strategy.join(broker)
            log.info("stopped consuming", queues=consumer.queues)
        except BaseException:
            strategy.abandon()
            raise

    def close(self) -> None:
        self.broker.close()


class Batches:
    """Commands: decode, apply with :class:`BatchApplier`, settle, one ``multiple`` ack per batch."""

    def __init__(
        self,
        applier: BatchApplier,
        settlement: Settlement,
        batch_size: int,
        batch_wait: float,
        metrics: MetricsSink = NO_METRICS,
    ) -> None:
        self.applier = applier
        self.settlement = settlement
        self.batch_size = batch_size
        self.first_wait, self.fill_wait = 0.5, batch_wait
        self.metrics = metrics

    def room(self) -> int:
        return self.batch_size

    def submit(self, broker: BlockingBroker, deliveries: list[Delivery]) -> None:
        started = time.perf_counter()
        with tracing.batch_span(deliveries):  # the batch's transaction and settlement, linked to each command
            good, handled = self.applier.decode_all(deliveries)
            handled += self.applier.apply(good)
            for h in handled:
                self.settlement.settle(broker, h)
        broker.ack_through(max(d.delivery_tag for d in deliveries))
        self.metrics.observe_batch(handled, time.perf_counter() - started)

    def poll(self, broker: BlockingBroker) -> None:
        pass  # every batch is settled when submitted

    def join(self, broker: BlockingBroker) -> None:
        pass

    def abandon(self) -> None:
        pass


class Window:
    """Payment steps: batches of up to ``batch_size`` in ``pool``, up to ``size`` steps in flight.  A batch
    reports its messages as they are settled (:meth:`worker.payment_runner.PaymentRunner.handle_batch`), and each
    is acked then, whatever the rest of its batch is still waiting for: a slow provider call holds up only its
    own message."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        runner: PaymentRunner,
        hold: DatabaseHold,
        settlement: Settlement,
        size: int,
        metrics: MetricsSink = NO_METRICS,
        batch_size: int = 1,
        slots: int | None = None,
    ) -> None:
        self.pool, self.runner, self.hold, self.settlement = pool, runner, hold, settlement
        self.size = size
        self.batch_size = batch_size
        #: batches running at once (the pool's threads); None: as many as ``size`` allows
        self.slots = slots
        self.metrics = metrics
        self.in_flight: dict[Future[list[Handled]], list[Delivery]] = {}
        #: steps a batch has settled, for this (the consumer's) thread to settle and ack
        self._reported: queue.SimpleQueue[Handled] = queue.SimpleQueue()
        #: delivery tags taken and not yet settled
        self._pending: set[int] = set()
        self.fill_wait = 0.002

    @property
    def first_wait(self) -> float:
        return 0.02 if self._pending else 0.5

    def room(self) -> int:
        room = self.size - len(self._pending)
        if self.slots is None:
            return room
        # a batch is only formed when a thread is free to run it: while every thread is busy, what arrives
        # waits in the prefetch and goes into the next batch whole, instead of a queue of small batches
        # behind the busy threads (at 150 ms a call, trickling steps made batches of one or two: two processes
        # completed 41 orders/s of 83 offered in bench_paid.py --mode latency)
        busy = sum(1 for f in self.in_flight if not f.done())
        return max(0, min(room, self.batch_size * (self.slots - busy)))

    def submit(self, broker: BlockingBroker, deliveries: list[Delivery]) -> None:
        for batch in batches_of(deliveries, self.batch_size):
            self._pending.update(d.delivery_tag for d in batch)
            self.in_flight[self.pool.submit(self.runner.handle_batch, batch, self._report)] = batch

    def _report(self, handled: list[Handled]) -> None:
        for h in handled:
            self._reported.put(h)

    def poll(self, broker: BlockingBroker) -> None:
        finished = [f for f in self.in_flight if f.done()]  # before draining: everything they reported is in
        outage: list[Handled] = []
        settled: list[int] = []
        try:
            while True:
                try:
                    h = self._reported.get_nowait()
                except queue.Empty:
                    break
                self._pending.discard(h.delivery.delivery_tag)
                if h.outage:
                    outage.append(h)
                else:
                    self._settle(broker, h, settled)
            for future in finished:
                batch = self.in_flight.pop(future)
                failure = future.exception()
                for d in batch:  # a batch that broke off (a bug): what it did not report fails like any failure
                    if failure is not None and d.delivery_tag in self._pending:
                        self._pending.discard(d.delivery_tag)
                        self._settle(broker, handled_from(d, failure), settled)
            if outage and self.hold.answers():
                # a step that started before an outage that is over now: an ordinary failure (delay tiers)
                for h in outage:
                    self._settle(broker, h, settled)
                outage = []
        finally:  # what was settled is acked, also when settling a later one failed
            self._ack(broker, settled, held=[h.delivery.delivery_tag for h in outage])
        if not outage:
            return
        # hold the work until the database is back (logged once, not once per step), then run it again, as
        # delivered again: like a redelivery by RabbitMQ, what the first run did (a provider call) may have
        # happened, so a step that takes a first delivery at its word must not take this one so
        self.hold.wait(outage[0].error)  # type: ignore[arg-type]
        self.submit(broker, [replace(h.delivery, redelivered=True) for h in outage])

    def join(self, broker: BlockingBroker) -> None:
        while self.in_flight or self._pending:
            broker.sleep(0.02)
            self.poll(broker)

    def abandon(self) -> None:
        for future in self.in_flight:
            future.exception()
        self.in_flight.clear()
        self._pending.clear()

    def _settle(self, broker: BlockingBroker, h: Handled, settled: list[int]) -> None:
        self.settlement.settle(broker, h)
        settled.append(h.delivery.delivery_tag)
        self.metrics.count([h])

    def _ack(self, broker: BlockingBroker, settled: list[int], held: list[int]) -> None:
        """Ack the steps just settled: those below every step still taken (running, or ``held`` for an
        outage) with one ``multiple`` ack, since every delivery before them is settled and acked too; each
        of the others on its own, now (a slow step holds up only its own message, never the acks after it).
        One frame for a run instead of one per step: 63.8 → 27.1 µs of the consumer's CPU per message and
        48.5 → 20.0 µs of RabbitMQ's, runs of 20 (``scripts/bench_acks.py``)."""
        if not settled:
            return
        floor = min(self._pending.union(held), default=None)
        below = sorted(t for t in settled if floor is None or t < floor)
        if len(below) > 1:
            broker.ack_through(below[-1])
        elif below:
            broker.ack(below[0])
        for tag in settled:
            if floor is not None and tag > floor:
                broker.ack(tag)
