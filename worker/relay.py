"""The outbox relay: publishes committed events with publisher confirms.

Exactly one relay is active: it holds a PostgreSQL advisory lock on its
LISTEN connection; others wait as standbys and take over when that
connection (and so the lock) goes away.  Each round selects unpublished rows
in id order (``FOR UPDATE SKIP LOCKED``), publishes them on one channel,
waits until the broker confirmed all of them, and only then marks them
published, in the same transaction.  A relay killed in between republishes
the batch under the same message ids, so consumers can deduplicate.  Under a
RabbitMQ resource alarm the broker blocks the publisher: the relay waits
(the round's transaction stays open) instead of giving up and publishing the
batch again, so an alarm of any length repeats nothing.

Events of one order leave in commit order: the transactions that write them
serialise on the order's row lock, so their ids grow in commit order, and
one relay publishes them in id order on one channel.

The poll is a keyset: ``id > :after`` on the partial index of unpublished
rows, so it never walks the index entries (and dead heap tuples) of the rows
it already published and deleted, however far autovacuum lags behind.
Ids come from a sequence and commit out of order (a worker that took id 10
may commit after id 11 was published), so ``after`` is not the last id
published but a floor below which every id is *settled*: its transaction
has ended, and the row, if committed, was published.  ``nextval`` holds a
``RowExclusiveLock`` on the sequence until its transaction ends; so after
reading the sequence's last value ``H`` and then the transactions holding
that lock, every id <= ``H`` is settled once all of those have ended (read
from ``pg_locks``: no xid arithmetic, no clock).  The floor then moves up to
``H`` (or to the last id of a full batch below it).  It lives in memory, per
relay session: a new session (a takeover, a restart) starts from id 0.

``SKIP LOCKED`` skips rows another transaction holds (a relay that lost its
lock but not yet its transaction, an operator's ``DELETE``); if that one rolls
back, the rows are unpublished again.  So before the floor moves, one more
look in the same transaction, after the batch's delete, asks for the lowest
unpublished id between where the poll started and where the floor would go:
a skipped row is found there (whether its holder is still at it or rolled
back), and the floor stays below it until a poll takes it.  No poll walks
the whole outbox again within a session.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions
import structlog
from sqlalchemy import Connection, Engine, event, text

from worker import tracing
from worker.metrics import NO_METRICS, MetricsSink
from worker.rabbit.connection import Outgoing
from worker.rabbit.publisher import PipelinedPublisher
from worker.reconnect import Standby, keep_running
from worker.settings import Settings
from worker.unit_of_work import OUTBOX_CHANNEL

log = structlog.get_logger("worker.relay")

#: advisory lock key of the active relay ("orders" in ASCII)
RELAY_LOCK_KEY = 0x6F7264657273
#: seconds between two housekeeping rounds (inbox and outbox retention)
HOUSEKEEPING_INTERVAL = 60.0
#: rows deleted per housekeeping statement, so no delete holds locks long
HOUSEKEEPING_CHUNK = 5000
#: a publishing round longer than this (seconds) is logged with where its time went
SLOW_ROUND_SECONDS = 2.0


_COLUMNS = (
    "SELECT id, event_id::text, exchange, routing_key, message_type, correlation_id, body,"
    " extract(epoch from created_at)::float8 AS created, traceparent FROM outbox"
)
#: the relay's poll: unpublished rows above the keyset floor, in id order (index ix_outbox_unpublished)
POLL = text(f"{_COLUMNS} WHERE id > :after AND published_at IS NULL ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED")
#: the poll before the keyset (issue 25): from the first unpublished entry, through every dead one
FULL_POLL = text(f"{_COLUMNS} WHERE published_at IS NULL ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED")
#: the outbox's id sequence, and whether each nextval reaches it (CACHE 1: else a session's
#: cached ids are handed out later without touching it, and no floor can be trusted)
_SEQUENCE = text(
    "SELECT s.seqrelid::int8, s.seqcache FROM pg_sequence s"
    " WHERE s.seqrelid = pg_get_serial_sequence('outbox', 'id')::regclass"
)
_LAST_ID = text("SELECT coalesce(pg_sequence_last_value(CAST(:seq AS int8)::oid::regclass), 0)")
#: the open transactions (but ours) that called nextval on the sequence: it holds RowExclusiveLock until they end
_HOLDERS = text(
    "SELECT coalesce(array_agg(virtualtransaction), '{}') FROM pg_locks"
    " WHERE locktype = 'relation' AND relation = CAST(:seq AS int8)::oid AND mode = 'RowExclusiveLock'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND pid IS DISTINCT FROM pg_backend_pid()"
)
#: after the batch's delete: an unpublished row the floor would pass is one the poll skipped (SKIP LOCKED)
_SKIPPED = text("SELECT min(id) FROM outbox WHERE id > :after AND id <= :reach AND published_at IS NULL")

#: tables the hot path reads by key whose planner statistics the active relay keeps up (see :meth:`Relay.analyze`)
ANALYZED_TABLES = (
    "orders",
    "order_items",
    "payments",
    "inbox",
    "outbox",
    "order_transitions",
    "order_history",
)
#: a table is re-analyzed once this many rows changed since its last ANALYZE, and at least this share of it
ANALYZE_MIN_CHANGED = 10_000
ANALYZE_SHARE_CHANGED = 0.2
#: ... and only when no ANALYZE (autovacuum's or anyone's) ran on it for this long
ANALYZE_QUIET_SECONDS = 300
_STALE_STATISTICS = text(
    "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema() AND relname = ANY(:tables)"
    " AND n_mod_since_analyze > greatest(:min_changed, :share * n_live_tup)"
    " AND coalesce(greatest(last_analyze, last_autoanalyze), '-infinity') < now() - make_interval(secs => :quiet)"
    " ORDER BY relname"
)

#: the housekeeping's retention deletes, a chunk at a time (inbox and order_history by their time's index; the
#: outbox's reads the table, so it runs only where a retention is set and rows are marked published)
_RETENTION_DELETES = {
    "outbox": text(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE published_at"
        " < now() - make_interval(secs => :secs) LIMIT :chunk)"
    ),
    "inbox": text(
        "DELETE FROM inbox WHERE ctid IN (SELECT ctid FROM inbox WHERE processed_at"
        " < now() - make_interval(secs => :secs) LIMIT :chunk)"
    ),
    # an order's story is kept as long as the inbox remembers its commands
    "order_history": text(
        "DELETE FROM order_history WHERE id IN (SELECT id FROM order_history WHERE at"
        " < now() - make_interval(secs => :secs) LIMIT :chunk)"
    ),
}

#: The relay's sessions plan without bitmap scans: its poll must walk the unpublished index in id order
#: and stop at its LIMIT.  Planned from statistics taken while few rows waited, a poll after a burst
#: (their estimate: 4 rows; there were 17,000) became a bitmap scan of every unpublished row above the
#: floor and a sort: 108 ms a poll against 3.6 ms in order (EXPLAIN ANALYZE on the soak's database),
#: and each slow poll let more rows pile up for the next (the soak's relay stalled for half a minute).
#: Its other statements read by key or by range, which a plain index scan serves as well.
_SESSION_PLANNING = "SET enable_bitmapscan = off"


def _plan_in_order(dbapi_connection: Any, _record: Any) -> None:
    """On each new connection of the relay's engine: :data:`_SESSION_PLANNING`, outside any transaction."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cur:
            cur.execute(_SESSION_PLANNING)
    finally:
        dbapi_connection.autocommit = autocommit


_MARK_PUBLISHED = text("UPDATE outbox SET published_at = now() WHERE id = ANY(:ids)")
_DELETE_PUBLISHED = text("DELETE FROM outbox WHERE id = ANY(:ids)")


class Relay:
    def __init__(self, settings: Settings, engine: Engine, metrics: MetricsSink = NO_METRICS) -> None:
        self.settings = settings
        self.engine = engine
        if not event.contains(engine, "connect", _plan_in_order):  # the engine is the relay's own (bootstrap)
            event.listen(engine, "connect", _plan_in_order)
        self.metrics = metrics
        self._last_housekeeping = 0.0
        self.keyset = Keyset()
        #: the connection of the latest transaction begun on the engine (the round's, while one runs)
        self._round: Connection | None = None

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set: active while it holds the lock, a standby otherwise."""
        # any failure (PostgreSQL, RabbitMQ, the lock's connection) ends the session; the next one starts afresh
        keep_running("relay", lambda: self._open(stop), stop, lost=(Exception,))

    def _open(self, stop: threading.Event | None = None) -> _RelaySession:
        listener = self._listen()
        try:
            if not self._try_lock(listener):
                raise Standby("another relay is active", self.settings.relay.poll_interval_seconds)
            # under a resource alarm it waits (heartbeats still tell a dead broker), and ends its wait on stop
            publisher = PipelinedPublisher(
                self.settings.rabbitmq.url.get_secret_value(),
                self.settings.rabbitmq.heartbeat_seconds,
                stop=stop,
                while_blocked=self._keep_round_alive,
            ).connect()
        except BaseException:
            listener.close()
            raise
        event.listen(self.engine, "begin", self._on_begin)
        log.info("relay active")
        self.keyset = Keyset()  # per session: a takeover starts from id 0
        return _RelaySession(self, listener, publisher)

    def _on_begin(self, conn: Connection) -> None:
        self._round = conn

    def _keep_round_alive(self) -> None:
        """While the broker blocks the round's publish (a resource alarm), a statement now and then in the
        round's transaction: PostgreSQL ends a transaction idle for 60 s (``worker/db.py``), and the batch
        would then be published again by the next round although the broker holds it already."""
        conn = self._round
        if conn is not None and not conn.closed and conn.in_transaction():
            conn.exec_driver_sql("SELECT 1")

    def _listen(self) -> Any:
        conn = psycopg2.connect(self.settings.database.dsn, connect_timeout=5, application_name="orders-relay")
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        return conn

    def _try_lock(self, conn: Any) -> bool:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK_KEY,))
            locked = bool(cur.fetchone()[0])
            if locked:
                cur.execute(f"LISTEN {OUTBOX_CHANNEL}")
            return locked

    def _loop(self, listener: Any, publisher: PipelinedPublisher, stop: threading.Event) -> None:
        batch_size = self.settings.relay.batch_size
        while not stop.is_set():
            published = self.publish_pending(publisher, batch_size)
            if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_INTERVAL:
                self.housekeeping()
            if published < batch_size:
                self._wait(listener, stop)

    def _wait(self, listener: Any, stop: threading.Event) -> None:
        """Sleep until NOTIFY, the polling interval, or stop."""
        ready, _, _ = select.select([listener], [], [], self.settings.relay.poll_interval_seconds)
        listener.poll()  # raises when the connection (and our lock) is gone
        listener.notifies.clear()
        if not ready:
            with listener.cursor() as cur:  # a lost lock connection must not go unnoticed
                cur.execute("SELECT 1")

    def publish_pending(self, publisher: PipelinedPublisher, limit: int) -> int:
        """Publish one batch of unpublished events; return how many."""
        keyset = self.keyset
        began = time.perf_counter()
        with self.engine.begin() as conn:
            # before the poll: what these statements find settled, the poll's snapshot sees committed
            settled, start = keyset.observe(conn)
            rows = conn.execute(POLL, {"after": start, "limit": limit}).all()
            polled = published = time.perf_counter()
            # unpacked below: looking columns up by name, and Decimal epochs, were a sixth of the relay CPU
            if rows:
                # with tracing on, each event continues the trace its row stored (worker/tracing.py)
                tracing.relay_publish(
                    publisher.publish_batch,
                    [
                        Outgoing(
                            exchange,
                            routing_key,
                            body.encode(),
                            {
                                "message_id": event_id,
                                "type": message_type,
                                "correlation_id": correlation_id,
                                "timestamp": int(created),
                                "app_id": "orders",
                            },
                        )
                        for _, event_id, exchange, routing_key, message_type, correlation_id, body, created, _ in rows
                    ],
                    [r[8] for r in rows],
                )
                published = time.perf_counter()
                # with no retention, delete: marking can never be a HOT update (the
                # column is in the partial index) and costs PostgreSQL 3x a delete
                done = _DELETE_PUBLISHED if self.settings.worker.outbox_retention_hours == 0 else _MARK_PUBLISHED
                conn.execute(done, {"ids": [r[0] for r in rows]})
            reach = keyset.reach(settled, rows[-1][0] if len(rows) == limit else None)
            # the batch took every id up to reach (no gap): nothing in between can have been skipped
            if reach - start > sum(1 for r in rows if r[0] <= reach):
                skipped = conn.execute(_SKIPPED, {"after": start, "reach": reach}).scalar()
                if skipped is not None:
                    reach = skipped - 1
            written = time.perf_counter()
        # committed: only now may the floor pass what this batch published
        keyset.advance(settled, reach)
        ended = time.perf_counter()
        if ended - began > SLOW_ROUND_SECONDS:
            self._slow_round(len(rows), began, polled, published, written, ended)
        if not rows:
            return 0
        self.metrics.relayed(len(rows), time.time() - rows[0][7])
        return len(rows)

    @staticmethod
    def _slow_round(rows: int, began: float, polled: float, published: float, written: float, ended: float) -> None:
        """Say where a round that held up publishing spent its time: the poll, the broker's confirms, the
        delete or mark and the commit (two soaks saw the outbox grow for ~20 s with nothing in any log:
        docs/benchmarks.md)."""
        log.warning(
            "relay round slow",
            rows=rows,
            seconds=round(ended - began, 3),
            poll_ms=round((polled - began) * 1000, 1),
            publish_ms=round((published - polled) * 1000, 1),
            write_ms=round((written - published) * 1000, 1),
            commit_ms=round((ended - written) * 1000, 1),
        )

    def housekeeping(self) -> dict[str, int]:
        """Delete published outbox rows and inbox rows past their retention."""
        self._last_housekeeping = began = time.monotonic()
        cfg = self.settings.worker
        deleted = dict.fromkeys(_RETENTION_DELETES, 0)
        retention = {
            "outbox": cfg.outbox_retention_hours * 3600,
            "inbox": cfg.inbox_retention_days * 86400,
            "order_history": cfg.inbox_retention_days * 86400,
        }
        for table, stmt in _RETENTION_DELETES.items():
            if table == "outbox" and cfg.outbox_retention_hours == 0:
                # the relay deletes what it publishes and never marks a row: there is nothing to look for, and
                # looking (published_at has no index) read the whole outbox heap, dead rows and all, every
                # minute while the relay published nothing: over 26 s after 25 minutes at 221 orders/s with
                # autovacuum off (bench_soak.py). Rows marked under an earlier retention: docs/configuration.md
                continue
            while True:
                with self.engine.begin() as conn:
                    n = conn.execute(stmt, {"secs": retention[table], "chunk": HOUSEKEEPING_CHUNK}).rowcount
                deleted[table] += n
                if n < HOUSEKEEPING_CHUNK:
                    break
        if any(deleted.values()):
            log.info(
                "housekeeping",
                seconds=round(time.monotonic() - began, 3),
                **{f"deleted_{k}": v for k, v in deleted.items()},
            )
        self.analyze()
        return deleted

    def analyze(self) -> list[str]:
        """ANALYZE the hot path's tables whose statistics fell far behind, and say which.

        Where autovacuum is off or lagging, nothing else does it, and a table that was never analyzed
        looks empty to the planner: with 466,000 rows in ``order_items`` and no statistics, the payment
        step's ``order_id = ANY(...)`` read of a batch's lines became a sequential scan of 280 ms and the
        paid path fell from 221 to about 130 orders/s within ten minutes (``scripts/bench_soak.py``).
        Where autovacuum keeps up it analyzes at 10 % changed rows, long before this does; ANALYZE
        samples a bounded number of rows and blocks no reads or writes."""
        with self.engine.connect() as conn:
            stale = list(
                conn.execute(
                    _STALE_STATISTICS,
                    {
                        "tables": list(ANALYZED_TABLES),
                        "min_changed": ANALYZE_MIN_CHANGED,
                        "share": ANALYZE_SHARE_CHANGED,
                        "quiet": ANALYZE_QUIET_SECONDS,
                    },
                ).scalars()
            )
        began = time.monotonic()
        for table in stale:  # names from the fixed tuple above, never from input
            with self.engine.begin() as conn:
                conn.execute(text(f"ANALYZE {table}"))
        if stale:  # publishing waits meanwhile: the time says what it cost
            log.info("planner statistics refreshed", tables=stale, seconds=round(time.monotonic() - began, 3))
        return stale


class Keyset:
    """The relay's keyset floor (module docstring): every id <= ``after`` is settled and published."""

    def __init__(self) -> None:
        #: the poll's floor
        self.after = 0
        #: every id <= this was settled before the last poll's snapshot (published or not yet)
        self.settled_to = 0
        #: (the sequence's last value, the transactions that held it then), until they have all ended
        self.pending: tuple[int, frozenset[str]] | None = None
        self._sequence = 0
        self._usable: bool | None = None

    def observe(self, conn: Any) -> tuple[int, int]:
        """Read the sequence, then who holds it; return up to which id all ids are settled, and where to poll from."""
        if self._usable is None:
            sequence, cache = conn.execute(_SEQUENCE).one()
            self._sequence, self._usable = int(sequence), int(cache) == 1
            if not self._usable:
                log.warning("outbox id sequence has CACHE > 1: the relay polls from id 0 every round")
        if not self._usable:
            return 0, 0
        last = int(conn.execute(_LAST_ID, {"seq": self._sequence}).scalar_one())
        holders = frozenset(conn.execute(_HOLDERS, {"seq": self._sequence}).scalar_one())
        settled = self.settled_to
        if self.pending is not None and not (self.pending[1] & holders):
            settled, self.pending = max(settled, self.pending[0]), None  # all of them have ended
        if not holders:
            settled, self.pending = max(settled, last), None  # no id <= last is still in flight
        elif self.pending is None:
            self.pending = (last, holders)
        return settled, self.after

    def reach(self, settled: int, last_of_full_batch: int | None) -> int:
        """How far the floor may move after this poll, its skipped rows aside.

        A batch short of the limit took every visible unpublished row above the floor, so all ids up
        to ``settled`` are published; a full one only those up to its last id."""
        settled = max(self.settled_to, settled)
        return settled if last_of_full_batch is None else min(settled, last_of_full_batch)

    def advance(self, settled: int, reach: int) -> None:
        """After the poll's transaction committed: the floor moves up to ``reach``, never down."""
        self.settled_to = max(self.settled_to, settled)
        self.after = max(self.after, reach)


class _RelaySession:
    """The active relay's connections: the lock's LISTEN connection and the pipelined publisher."""

    def __init__(self, relay: Relay, listener: Any, publisher: PipelinedPublisher) -> None:
        self.relay, self.listener, self.publisher = relay, listener, publisher

    def run(self, stop: threading.Event) -> None:
        self.relay._loop(self.listener, self.publisher, stop)

    def close(self) -> None:
        if event.contains(self.relay.engine, "begin", self.relay._on_begin):
            event.remove(self.relay.engine, "begin", self.relay._on_begin)
        self.relay._round = None
        self.publisher.close()
        if not self.listener.closed:
            self.listener.close()
