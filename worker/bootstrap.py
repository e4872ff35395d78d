"""All the wiring in one place: which parts a process runs and what each is given.

The CLI's long-running verbs (``orders worker``, ``orders relay``) and the
tests call these; nothing else constructs consumers, so a change of how the
parts fit together is made here, once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor

import structlog
from sqlalchemy import Engine

from handlers import command_handlers
from handlers.payments.base import PaymentGateway
from schema.topology import COMMAND_QUEUES, PAYMENTS_QUEUE, WORK_QUEUES
from worker import db, logs, tracing
from worker.commands import Applier, BatchApplier
from worker.consume import Batches, Consumer, Window
from worker.expiry import ExpirySweep
from worker.identity import Identities
from worker.metrics import NO_METRICS, Metrics, MetricsSink
from worker.payment_runner import PaymentRunner
from worker.rabbit.connection import BlockingBroker
from worker.reconnect import DatabaseHold
from worker.relay import Relay
from worker.settings import Settings
from worker.settlement import Settlement
from worker.unit_of_work import Views

#: how often a pool process without command queues makes the cache refreshes it owes (seconds)
IDLE_SECONDS = 0.5


def command_consumer(
    settings: Settings,
    engine: Engine,
    queues: list[str],
    views: Views | None = None,
    metrics: MetricsSink = NO_METRICS,
) -> Consumer:
    """The command queues, in batches: one transaction a batch, one by one when that fails."""
    cfg = settings.worker
    senders = Identities.of(settings)
    handlers = command_handlers(settings.orders.rules())
    applier = Applier(engine, cfg.inplace_retries, views=views, identities=senders, handlers=handlers)
    settlement = Settlement(cfg.retry_delays_seconds, metrics, senders)

    def batches(broker: BlockingBroker, stop: threading.Event, tick: Callable[[], None]) -> Batches:
        return Batches(
            BatchApplier(applier, DatabaseHold(engine, stop, broker.sleep, tick)),
            settlement,
            cfg.batch_size,
            cfg.batch_wait_ms / 1000,
            metrics,
        )

    return Consumer(
        "commands",
        settings,
        queues,
        cfg.prefetch,
        batches,
        declare=True,
        liveness_file=cfg.liveness_file or None,
        idle=views.settle_owed if views is not None else None,
    )


#: batches of payment steps one process works on at once: one in each transaction while others call
PAYMENT_BATCHES_IN_FLIGHT = 4


def payment_runner(
    settings: Settings,
    engine: Engine,
    gateways: Mapping[str, PaymentGateway],
    views: Views | None = None,
    metrics: MetricsSink = NO_METRICS,
    calls: Executor | None = None,
) -> PaymentRunner:
    return PaymentRunner(
        engine,
        gateways,
        settings.worker.inplace_retries,
        views=views,
        metrics=metrics,
        capture_settle_seconds=settings.worker.capture_settle_seconds,
        calls=calls,
    )


def payment_consumer(
    settings: Settings, runner: PaymentRunner, pool: ThreadPoolExecutor, metrics: MetricsSink = NO_METRICS
) -> Consumer:
    """``orders.payments`` in batches of ``worker.payment_batch_size``, a few batches in flight."""
    batch = settings.worker.payment_batch_size
    size = batch * PAYMENT_BATCHES_IN_FLIGHT
    settlement = Settlement(settings.worker.retry_delays_seconds, metrics, Identities.of(settings))

    def window(broker: BlockingBroker, stop: threading.Event, tick: Callable[[], None]) -> Window:
        hold = DatabaseHold(runner.engine, stop, broker.sleep)
        return Window(pool, runner, hold, settlement, size, metrics, batch_size=batch, slots=PAYMENT_BATCHES_IN_FLIGHT)

    return Consumer("payments", settings, [PAYMENTS_QUEUE], size, window)


def run_payments(settings: Settings, runner: PaymentRunner, stop: threading.Event, metrics: MetricsSink) -> None:
    with ThreadPoolExecutor(PAYMENT_BATCHES_IN_FLIGHT, thread_name_prefix="payment-batch") as pool:
        payment_consumer(settings, runner, pool, metrics).run(stop)


def worker_process(settings: Settings, index: int, stop: threading.Event, queues: list[str]) -> None:
    """One pool process: the command consumer, and the payment step in a thread of its own."""
    from handlers.payments import build_gateways
    from worker.read_model import OrderCache, make_redis

    logs.configure(settings.logging.level, settings.logging.format)
    structlog.contextvars.bind_contextvars(worker=index)
    tracing.setup(settings.tracing, "orders-worker")  # in the child: the exporter's thread does not survive a fork
    engine = db.make_engine(settings.database, pre_ping=False)
    metrics = Metrics()
    cache = OrderCache(engine, make_redis(settings.redis), settings.redis.cache_ttl_seconds)
    queues = queues or list(WORK_QUEUES)
    sweep = threading.Thread(target=expiry_sweep(settings, engine, cache).run, args=(stop,), name="expiry")
    sweep.start()
    payments = None
    calls = None
    if PAYMENTS_QUEUE in queues:
        # the provider calls of every batch, at once: the window is as wide as worker.payment_concurrency
        calls = ThreadPoolExecutor(settings.worker.payment_concurrency, thread_name_prefix="payment-call")
        runner = payment_runner(settings, engine, build_gateways(settings), views=cache, metrics=metrics, calls=calls)
        payments = threading.Thread(target=run_payments, args=(settings, runner, stop, metrics), name="payments")
        payments.start()
    commands = [q for q in queues if q in COMMAND_QUEUES]
    if commands:
        command_consumer(settings, engine, commands, views=cache, metrics=metrics).run(stop)
    else:
        while not stop.wait(IDLE_SECONDS):
            cache.settle_owed()
    if payments is not None:
        payments.join()
    if calls is not None:
        calls.shutdown(wait=True)
    sweep.join()
    tracing.flush()  # a forked pool process ends without atexit handlers


def expiry_sweep(settings: Settings, engine: Engine, views: Views | None = None) -> ExpirySweep:
    """Orders past their payment deadline become expired: one active sweep in the pool (``worker.expiry``)."""
    cfg = settings.orders
    return ExpirySweep(engine, settings.database.dsn, cfg.rules(), cfg.expiry_sweep_seconds, views)


def relay(settings: Settings, metrics: MetricsSink = NO_METRICS) -> Relay:
    tracing.setup(settings.tracing, "orders-relay")
    return Relay(settings, db.make_engine(settings.database, pool_size=2, pre_ping=False), metrics)
