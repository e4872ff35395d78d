"""The order read model: what ``GET /orders/{id}`` shows, cached in Redis.

The worker refreshes a cached entry after every commit that touched the
order (write-through, so a read right after an outcome sees it); an order
nobody has read is not cached, and its commits write nothing to Redis but
the mark below (its first read caches it); entries also expire after
``redis.cache_ttl_seconds``.  When Redis is down, reads
fall back to PostgreSQL and writes to the cache are skipped: the cache is an
accelerator, never the record.  No secrets and no card data are in the view:
the Stripe client secret is what the buyer's browser needs to finish a
payment and is shown only to the order's owner (or an admin), as Stripe
intends.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterable
from typing import Any, Literal, NotRequired, Protocol, TypedDict, cast

import redis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from handlers.orders import ENDED_UNPAID, Status
from handlers.unit_of_work import PaymentStatus
from schema import tables
from worker.metrics import NO_METRICS
from worker.redis_gate import RedisBusy, RedisGate
from worker.settings import RedisSettings

log = structlog.get_logger("worker.read_model")

KEY_PREFIX = "orders:view:"

#: Store a view only when it is newer than the one cached: two writers that
#: refresh out of order can never put an older state back.  A mark left by
#: :data:`_OUTDATE` (a version without a view) gives way to the view of
#: that same version.
_STORE_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'version')
if current then
  local have, new = tonumber(current), tonumber(ARGV[1])
  if have > new or (have == new and redis.call('HEXISTS', KEYS[1], 'view') == 1) then return 0 end
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'view', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

#: Before a commit: replace the cached view by a mark carrying the version
#: being committed.  Reads then miss and go to PostgreSQL, and no view older
#: than that version can be stored, so a worker that dies between its commit
#: and its refresh leaves nothing stale behind (found by the chaos run).
#: Answers 1 when a view was cached (it is owed a write-through after the
#: commit), 0 when there was none: nobody read the order since it last
#: changed, and its next read caches it.
_OUTDATE = """
local current = redis.call('HGET', KEYS[1], 'version')
local cached = redis.call('HEXISTS', KEYS[1], 'view')
if current and tonumber(current) >= tonumber(ARGV[1]) then return cached end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return cached
"""

#: how long a mark of :data:`_OUTDATE` lives at most (seconds): its commit
#: replaces it at once; one that never committed only costs reads a while
OUTDATED_TTL = 60

_VIEW_SQL = text(
    "SELECT o.order_id::text, o.user_id, o.status, o.currency, o.total, o.payment_provider, o.next_action, o.shipment,"
    " o.reason, o.created_at, o.updated_at, o.paid_at, p.status AS payment_status,"
    " p.amount_refunded, " + tables.ORDER_VERSION_SQL + " AS version,"
    " COALESCE(json_agg(json_build_object('product_id', i.product_id, 'quantity', i.quantity,"
    " 'unit_price', i.unit_price) ORDER BY i.line_no) FILTER (WHERE i.order_id IS NOT NULL), '[]') AS items"
    " FROM orders o LEFT JOIN payments p USING (order_id) LEFT JOIN order_items i USING (order_id)"
    " WHERE o.order_id = ANY(CAST(:ids AS uuid[])) GROUP BY o.order_id, p.status, p.amount_refunded"
)


class LineViewData(TypedDict):
    product_id: str
    quantity: int
    unit_price: int


class PaymentViewData(TypedDict):
    """The order's payment as its owner sees it (:func:`payment_view`)."""

    provider: str
    #: the payment's status (``handlers.unit_of_work.PaymentStatus``), ``not_started`` before the first attempt
    status: str
    #: only while money goes back or went back
    refund: NotRequired[Literal["pending", "partial", "refunded"]]
    amount_refunded: NotRequired[int]


class OrderViewData(TypedDict):
    """An order's view: what :func:`load_views` reads, the cache holds (as JSON) and the shim answers with.

    ``worker.shim.models.OrderView`` is its public form (the fields a client sees); ``version`` orders the
    cached copies (a view never replaces a newer one).
    """

    order_id: str
    user_id: str
    #: a ``handlers.orders.Status`` value
    status: str
    total: int
    currency: str | None
    items: list[LineViewData]
    payment: PaymentViewData
    next_action: dict[str, str] | None
    shipment: dict[str, str] | None
    reason: str | None
    created_at: str
    updated_at: str
    paid_at: str | None
    version: int


def load_views(engine: Engine, order_ids: Iterable[str]) -> dict[str, OrderViewData]:
    """Order views from PostgreSQL, by order id."""
    ids = list(order_ids)
    if not ids:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(_VIEW_SQL, {"ids": ids}).mappings().all()
    views: dict[str, OrderViewData] = {}
    for r in rows:
        views[r["order_id"]] = {
            "order_id": r["order_id"],
            "user_id": r["user_id"],
            "status": r["status"],
            "total": r["total"],
            "currency": r["currency"],
            "items": r["items"],
            "payment": payment_view(r["payment_provider"], r["payment_status"], r["amount_refunded"], r["status"]),
            "next_action": r["next_action"],
            "shipment": r["shipment"],
            "reason": r["reason"],
            "created_at": r["created_at"].isoformat(),
            "updated_at": r["updated_at"].isoformat(),
            "paid_at": r["paid_at"].isoformat() if r["paid_at"] else None,
            "version": r["version"],
        }
    return views


def payment_view(provider: str, status: str | None, refunded: int | None, order_status: str) -> PaymentViewData:
    """The payment as the order's owner sees it, with the refund's progress: ``pending`` while the service gives
    back the money of an order that ended (cancelled after payment, or paid after it ended), ``partial`` after a
    partial refund at the provider, ``refunded`` once it all went back."""
    view: PaymentViewData = {"provider": provider, "status": status or "not_started"}
    refund: Literal["pending", "partial", "refunded"] | None = None
    if status == PaymentStatus.REFUNDED:
        refund = "refunded"
    elif status == PaymentStatus.SUCCEEDED and Status(order_status) in ENDED_UNPAID:
        refund = "pending"
    elif refunded:
        refund = "partial"
    if refund is not None:
        view["refund"] = refund
        view["amount_refunded"] = refunded or 0
    return view


def make_redis(cfg: RedisSettings) -> redis.Redis:
    # one quick attempt: a cache that is down must cost a read milliseconds, not seconds
    return redis.Redis(
        host=cfg.host,
        port=cfg.port,
        db=cfg.db,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


class _SheddingPool(aioredis.BlockingConnectionPool):
    """A bounded pool that tells local overload from an outage.

    When every connection stays in use for the pool's timeout, it raises
    :class:`~worker.redis_gate.RedisBusy` instead of redis-py's
    ``ConnectionError("No connection available.")``: the request is shed,
    and nobody takes Redis for dead.
    """

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().get_connection(*args, **options)
        except redis.ConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):  # waited for a free connection in vain
                raise RedisBusy(f"all {self.max_connections} Redis connections in use") from exc
            raise


def make_async_redis(cfg: RedisSettings, pool_size: int, pool_timeout: float) -> aioredis.Redis:
    """The asyncio client of the shim, with the same quick-failure settings.

    A bounded pool of ``pool_size`` connections: under a burst, requests
    wait up to ``pool_timeout`` seconds for one instead of opening hundreds,
    then get :class:`~worker.redis_gate.RedisBusy`.
    """
    pool = _SheddingPool(  # type: ignore[call-overload]  # a float timeout works; the stub says int
        max_connections=pool_size,
        timeout=pool_timeout,
        host=cfg.host,
        port=cfg.port,
        db=cfg.db,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=AsyncRetry(NoBackoff(), 0),
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


def _store_args(view: OrderViewData, ttl: int) -> list[Any]:
    return [view["version"], json.dumps(view, separators=(",", ":")), ttl]


class CacheMetrics(Protocol):
    """What the cache reports (the workers' and the shim's metrics both do)."""

    def cache(self, result: str) -> None: ...


class _CachedViews:
    """What the blocking and the asyncio caches share: settings, counting, decoding."""

    def __init__(
        self,
        engine: Engine,
        client: Any,
        ttl_seconds: int,
        metrics: CacheMetrics = NO_METRICS,
        gate: RedisGate | None = None,
    ) -> None:
        self.engine = engine
        self.redis = client
        self.ttl = ttl_seconds
        self.metrics = metrics
        self.gate = gate or RedisGate("order views")
        self._store_script = client.register_script(_STORE_IF_NEWER)

    def _count(self, result: str) -> None:
        self.metrics.cache(result)

    def _cached(self, raw: bytes | None) -> OrderViewData | None:
        """The view Redis gave (counted as a hit), or None: a miss, or an error while Redis is down."""
        if raw is not None:
            self._count("hit")
            return cast(OrderViewData, json.loads(raw))  # stored by _store_args: a view as load_views made it
        self._count("error" if self.gate.down else "miss")
        return None


class OrderCache(_CachedViews):
    """Read-through cache of order views; every Redis failure degrades to PostgreSQL.

    A write-through that could not be made (Redis down, or skipped for a few
    seconds after a failure) is remembered and made with the next refresh
    once Redis answers again, or by :meth:`settle_owed`, which an idle
    worker calls: otherwise a view cached by another process meanwhile (the
    shim caches what it reads) would stay behind the record until it
    expires (found by the chaos run: orders cached ``awaiting_payment`` that
    were ``completed``).
    """

    #: order ids whose refresh is owed, at most; beyond it they are dropped (their views expire on their own)
    MISSED_MAX = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outdate_script = self.redis.register_script(_OUTDATE)  # only the writers mark views outdated
        self._missed: set[str] = set()
        self._lock = threading.Lock()  # the command and payment threads share a process's cache

    def get(self, order_id: str) -> OrderViewData | None:
        raw = None
        if self.gate.usable():
            try:
                raw = self.redis.hget(KEY_PREFIX + order_id, "view")
                self.gate.succeeded()
            except redis.RedisError as exc:
                self.gate.failed(exc)
        view = self._cached(raw)
        if view is None:
            view = load_views(self.engine, [order_id]).get(order_id)
            if view is not None:
                self._store({order_id: view})
        return view

    def refresh(self, order_ids: Iterable[str]) -> None:
        """After a commit: write the new views through, and any owed from before.

        Best effort, never raises: the commit stands whatever happens here.
        Views that could not be written (Redis away, or PostgreSQL not
        readable just now) stay owed.
        """
        ids = set(order_ids)
        if not self.gate.usable():
            self._owe(ids)
            return
        with self._lock:
            ids |= self._missed
            self._missed = set()
        try:
            stored = self._store(load_views(self.engine, ids))
        except SQLAlchemyError as exc:
            log.debug("order views not refreshed; the database is unavailable", error=str(exc))
            stored = False
        if not stored:
            self._owe(ids)

    def outdate(self, versions: dict[str, int]) -> set[str]:
        """Before the commit of these versions: mark the cached views outdated (best effort); the orders
        whose views were cached, which the commit's :meth:`refresh` writes through.

        An order with no view cached gets the mark alone: writing its view
        after the commit would cost a query and a write for a read that may
        never come (the payment step's orders, as a rule); its first read
        caches it.  A view that cannot be marked (Redis down) is owed a
        refresh, as after a missed write-through.
        """
        if not versions:
            return set()
        if self.gate.usable():
            try:
                ids = list(versions)
                cached = self._evalsha(
                    self._outdate_script, [([KEY_PREFIX + oid], [versions[oid], OUTDATED_TTL]) for oid in ids]
                )
                self.gate.succeeded()
                return {oid for oid, was in zip(ids, cached, strict=True) if was}
            except redis.RedisError as exc:
                self.gate.failed(exc)
        self._owe(set(versions))
        return set()

    def _evalsha(self, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """``script`` once per (keys, args), in one pipeline, by its SHA: redis-py's own script calls in a
        pipeline ask ``SCRIPT EXISTS`` first, a round trip per pipeline (an eighth of a payment step's time).
        A Redis that forgot the script (restarted) is given it again, and the pipeline sent once more."""

        def send() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(pipe.execute())

        try:
            return send()
        except redis.exceptions.NoScriptError:
            self.redis.script_load(script.script)
            return send()

    def settle_owed(self) -> None:
        """Make the refreshes still owed once Redis answers again, without waiting for a commit.

        For a worker with nothing to do: after an outage, the last changes
        before it went quiet would otherwise stay behind in the cache until
        their views expire.
        """
        if self._missed and self.gate.usable():
            self.refresh(())

    def _owe(self, ids: set[str]) -> None:
        with self._lock:
            self._missed |= ids
            if len(self._missed) > self.MISSED_MAX:
                log.warning(
                    "too many order views left to refresh; they expire on their own",
                    dropped=len(self._missed),
                    ttl_seconds=self.ttl,
                )
                self._missed = set()

    def _store(self, views: dict[str, OrderViewData]) -> bool:
        """Store views newer than the cached ones; False when Redis could not be asked."""
        if not views:
            return True
        if not self.gate.usable():
            return False
        try:
            self._evalsha(
                self._store_script, [([KEY_PREFIX + oid], _store_args(view, self.ttl)) for oid, view in views.items()]
            )
            self.gate.succeeded()
            return True
        except redis.RedisError as exc:
            self.gate.failed(exc)
            return False


class AsyncOrderCache(_CachedViews):
    """:class:`OrderCache`'s read path for the shim's event loop.

    Redis is asked without leaving the loop; a miss (or Redis down) reads
    PostgreSQL in the thread pool, since SQLAlchemy's engine is synchronous.
    """

    async def get(self, order_id: str) -> OrderViewData | None:
        from starlette.concurrency import run_in_threadpool

        raw = None
        if self.gate.usable():
            try:
                raw = await self.redis.hget(KEY_PREFIX + order_id, "view")
                self.gate.succeeded()
            except redis.RedisError as exc:
                self.gate.failed(exc)
        view = self._cached(raw)
        if view is not None:
            return view
        view = (await run_in_threadpool(load_views, self.engine, [order_id])).get(order_id)
        if view is not None and self.gate.usable():
            try:
                await self._store_script(keys=[KEY_PREFIX + order_id], args=_store_args(view, self.ttl))
                self.gate.succeeded()
            except redis.RedisError as exc:
                self.gate.failed(exc)
            except RedisBusy:
                pass  # the answer is at hand: shedding it would waste it; a later read caches the view
        return view
