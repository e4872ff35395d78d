"""The expiry sweep: orders ``awaiting_payment`` past ``orders.payment_timeout_minutes`` become ``expired``.

Why a sweep and not a delayed message per order: a delay queue per timeout
value (RabbitMQ has no per-message delay without a plugin) would keep a
message per waiting order in a quorum queue for the whole timeout, cost
every awaiting order an outbox row, a publish and a consume even when it is
paid, and keep the old timeout for orders already waiting when the setting
changes.  The sweep costs a waiting order one entry in a partial index
(``ix_orders_awaiting_since``: only waiting orders are in it) and nothing
else, and reads the timeout when it runs.

How: every worker process runs an :class:`ExpirySweep` thread; one at a
time is active, holding a PostgreSQL advisory lock on a connection of its
own, as the relay does (the others stand by and take over within
``orders.expiry_sweep_seconds`` when the holder's connection goes: a killed
process, a failover).  Each round takes the orders waiting since before
``now() - timeout``, oldest first, :data:`CHUNK` at a time, ``FOR UPDATE
SKIP LOCKED``, and applies :func:`handlers.expire_order.expire_order` to
each in one transaction with an inbox row per order (consumer
:data:`CONSUMER`, message id ``expire-<order id>``): the same unit of work,
events through the outbox, conditional UPDATE.  So an order expires exactly
once however many sweeps run (the lock is for economy, not for
correctness: the row lock, the status guard and the inbox row are), and a
payment landing in the same instant either completes the order first (the
sweep then skips it) or finds it expired and is refunded.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg2
import psycopg2.extensions
import structlog
from sqlalchemy import Engine

from handlers.expire_order import EXPIRE_ORDER, expire_order, expiry_message_id
from handlers.orders import Rules
from handlers.outcome import MessageContext, OutcomeResult
from worker.reconnect import Standby, keep_running
from worker.unit_of_work import Views, order_transaction

log = structlog.get_logger("worker.expiry")

#: advisory lock key of the active sweep ("expiry" in ASCII)
EXPIRY_LOCK_KEY = 0x657870697279
#: inbox consumer name of expiries
CONSUMER = "expiry"
#: orders expired per transaction
CHUNK = 200


class ExpirySweep:
    """Expires overdue orders, a chunk per transaction, while it holds the sweep's lock."""

    def __init__(self, engine: Engine, dsn: str, rules: Rules, interval: float, views: Views | None = None) -> None:
        self.engine, self.dsn, self.rules, self.interval, self.views = engine, dsn, rules, interval, views

    def run(self, stop: threading.Event) -> None:
        """Sweep every ``interval`` seconds until ``stop``: active while holding the lock, a standby otherwise."""
        if self.rules.payment_timeout_minutes <= 0:
            log.info("expiry off (orders.payment_timeout_minutes is 0)")
            return
        keep_running("expiry", self._open, stop, lost=(Exception,))

    def _open(self) -> _SweepSession:
        conn = psycopg2.connect(self.dsn, connect_timeout=5, application_name="orders-expiry")
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (EXPIRY_LOCK_KEY,))
                if not (cur.fetchone() or (False,))[0]:
                    raise Standby("another process sweeps", self.interval)
        except BaseException:
            conn.close()
            raise
        log.info("expiry sweep active", timeout_minutes=self.rules.payment_timeout_minutes)
        return _SweepSession(self, conn)

    def sweep(self) -> int:
        """Expire every order overdue now; how many."""
        expired = 0
        while True:
            done = self._chunk()
            expired += done
            if done < CHUNK:
                return expired

    def _chunk(self) -> int:
        done = 0
        timeout = self.rules.payment_timeout_minutes * 60
        with order_transaction(self.engine, CONSUMER, self.views) as uow:
            due = uow.overdue(timeout, CHUNK)
            if not due:
                return 0
            mids = {expiry_message_id(order_id): order_id for order_id in due}
            fresh = uow.claim(mids)
            uow.preload(due, ())
            for mid, order_id in mids.items():
                order = uow.order(order_id)
                if mid not in fresh or order is None:
                    continue
                uow.handling(mid, EXPIRE_ORDER, order.correlation_id)
                outcome = expire_order(
                    order, MessageContext(mid, EXPIRE_ORDER, order.correlation_id, order_id), uow, self.rules
                )
                done += outcome.result is OutcomeResult.APPLIED
        if done:
            log.info("orders expired", count=done)
        return len(due)


class _SweepSession:
    def __init__(self, sweep: ExpirySweep, conn: Any) -> None:
        self.sweep, self.conn = sweep, conn

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sweep.sweep()
            with self.conn.cursor() as cur:  # the lock's connection: its loss must not go unnoticed
                cur.execute("SELECT 1")
            stop.wait(self.sweep.interval)

    def close(self) -> None:
        try:
            self.conn.close()
        except psycopg2.Error:
            pass
