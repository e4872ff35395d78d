"""The Redis read model: refreshed after commits, never regresses, survives Redis being down."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from sqlalchemy import text

from schema.topology import queue_of
from worker.commands import Applier
from worker.outcomes import Result
from worker.rabbit.connection import Delivery
from worker.read_model import KEY_PREFIX, OrderCache, load_views, make_redis
from worker.unit_of_work import PostgresUnitOfWork


def test_views_are_written_through_after_commit_and_an_older_one_never_wins(
    service, bus, clean_db, settings, wait, make_place, commands_only
):
    client = make_redis(settings.redis)
    cache = OrderCache(clean_db, client, 60)
    service("worker", "--processes", "1", *commands_only)
    order_id = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=order_id))
    view = wait(lambda: cache.get(order_id), what="order placed")  # a read caches the view
    assert view["status"] == "pending" and view["total"] == 300 and view["items"][0]["product_id"] == "sku-apple"
    assert json.loads(client.hget(KEY_PREFIX + order_id, "view"))["status"] == "pending"
    bus.publish("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}})
    # the worker writes the new state through after its commit: no read in between
    wait(lambda: json.loads(client.hget(KEY_PREFIX + order_id, "view"))["status"] == "cancelled", what="refreshed")

    newest = json.loads(client.hget(KEY_PREFIX + order_id, "view"))
    stale = {**newest, "status": "pending", "version": newest["version"] - 1}
    cache._store({order_id: stale})  # a late writer with an older state
    assert json.loads(client.hget(KEY_PREFIX + order_id, "view"))["status"] == "cancelled"
    assert client.ttl(KEY_PREFIX + order_id) > 0


def test_reads_fall_back_to_postgresql_when_redis_is_unreachable(service, bus, clean_db, settings, wait, make_place):
    service("worker", "--processes", "1")
    order_id = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=order_id))

    def placed() -> bool:
        with clean_db.connect() as conn:
            return conn.execute(text("SELECT 1 FROM orders")).first() is not None

    wait(placed)
    nowhere = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2)
    cache = OrderCache(clean_db, nowhere, 60)
    assert cache.get(order_id)["status"] == "pending"
    assert cache.get(str(uuid.uuid4())) is None


def test_a_refresh_missed_while_redis_was_away_is_made_once_it_is_back(
    service, bus, clean_db, settings, wait, make_place, commands_only
):
    """Found by the chaos run: a view cached by the shim stayed behind the record after the worker's
    write-through was skipped during a Redis outage."""
    client = make_redis(settings.redis)
    service("worker", "--processes", "1", *commands_only)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    for order_id in (first, second):
        bus.publish("PlaceOrder", make_place(order_id=order_id))
    reader = OrderCache(clean_db, client, 60)
    wait(lambda: reader.get(first) and reader.get(second), what="both placed and cached")
    with clean_db.begin() as conn:  # the order moves on while this process cannot reach Redis
        conn.execute(
            text(
                "UPDATE orders SET status = 'cancelled', updated_at = clock_timestamp()"
                " WHERE order_id = CAST(:o AS uuid)"
            ),
            {"o": first},
        )
    writer = OrderCache(clean_db, client, 60)
    writer.gate.failed(redis.ConnectionError("away"))  # as after a failure: Redis is skipped for a while
    writer.refresh({first})
    assert json.loads(client.hget(KEY_PREFIX + first, "view"))["status"] == "pending"  # behind, for now
    writer.gate.retry_after = 0
    writer.gate.failed(redis.ConnectionError("away"))
    writer.refresh({second})  # the next commit, with Redis back
    assert json.loads(client.hget(KEY_PREFIX + first, "view"))["status"] == "cancelled"


def test_an_idle_worker_makes_the_refreshes_it_owes_once_redis_answers_again(
    service, bus, clean_db, settings, wait, make_place, commands_only, tcp_proxy
):
    """The owed refreshes used to wait for the worker's next commit: a worker that went quiet
    after a Redis outage left the views it could not write behind the record until they expired."""
    client = make_redis(settings.redis)
    link = tcp_proxy(settings.redis.port)  # the worker's only way to Redis
    service("worker", "--processes", "1", *commands_only, ORDERS_REDIS__PORT=str(link.port))
    order_id = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=order_id))
    reader = OrderCache(clean_db, client, 600)
    wait(lambda: reader.get(order_id), what="order placed and cached")

    link.down()  # the worker cannot reach Redis; the shim (this reader) still can
    bus.publish("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}})

    def status_in_postgresql() -> str:
        with clean_db.connect() as conn:
            return str(
                conn.execute(
                    text("SELECT status FROM orders WHERE order_id = CAST(:o AS uuid)"), {"o": order_id}
                ).scalar()
            )

    wait(lambda: status_in_postgresql() == "cancelled", what="cancel committed")
    time.sleep(1)  # the worker's write-through has failed by now
    assert json.loads(client.hget(KEY_PREFIX + order_id, "view"))["status"] == "pending"  # behind, for now

    link.up()  # no command follows: only the idle worker can make the refresh it owes
    wait(
        lambda: json.loads(client.hget(KEY_PREFIX + order_id, "view"))["status"] == "cancelled",
        timeout=20,
        what="the owed refresh made without a new commit",
    )


def test_a_refresh_never_raises_and_what_it_could_not_write_stays_owed(settings):
    """After a commit the batch stands: PostgreSQL not answering the view query must not fail it."""
    from sqlalchemy import create_engine

    nowhere = create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 1})
    cache = OrderCache(nowhere, make_redis(settings.redis), 60)
    cache.gate.failed(redis.ConnectionError("away"))
    order_id = str(uuid.uuid4())
    cache.refresh({order_id})  # Redis skipped for a while: owed
    assert cache._missed == {order_id}
    cache.gate.retry_after = 0
    cache.gate.failed(redis.ConnectionError("away"))  # Redis may be asked again
    cache.refresh(())  # after a commit: never raises, the commit stands
    assert cache._missed == {order_id}
    cache.settle_owed()  # the idle call
    assert cache._missed == {order_id}


class _DiesAfterCommit(OrderCache):
    """The views of a worker killed between its commit and its write-through."""

    def refresh(self, order_ids: Iterable[str]) -> None:
        pass


def _apply(applier: Applier, kind: str, body: dict[str, Any]) -> Any:
    good, bad = applier.decode_all(
        [
            Delivery(
                delivery_tag=1,
                exchange="orders.commands",
                routing_key="x",
                queue=queue_of(kind) or "",
                body=json.dumps(body).encode(),
                message_id=str(uuid.uuid4()),
                message_type=kind,
                correlation_id=None,
                reply_to=None,
                content_type="application/json",
                headers={},
                redelivered=False,
            )
        ]
    )
    assert not bad
    return applier.apply_one(*good[0])


def test_a_worker_killed_between_commit_and_write_through_leaves_no_stale_view(clean_db, settings, make_place):
    """Found by the chaos run (--real-restarts): a worker SIGKILLed right after committing a
    PaymentConfirmed left the order cached as awaiting_payment while PostgreSQL said completed."""
    client = make_redis(settings.redis)
    reader = OrderCache(clean_db, client, 600)  # the shim
    order_id = str(uuid.uuid4())
    assert _apply(Applier(clean_db), "PlaceOrder", make_place(order_id=order_id)).result is Result.APPLIED
    assert reader.get(order_id)["status"] == "pending"  # cached

    dying = Applier(clean_db, views=_DiesAfterCommit(clean_db, client, 600))
    cancel = {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}}
    assert _apply(dying, "CancelOrder", cancel).result is Result.APPLIED

    assert reader.get(order_id)["status"] == "cancelled"  # the old view was outdated before the commit
    assert json.loads(client.hget(KEY_PREFIX + order_id, "view"))["status"] == "cancelled"  # and cached again


def test_a_view_read_before_the_commit_cannot_be_stored_over_the_outdated_mark(clean_db, settings, make_place):
    """The race the mark closes: a reader that loaded the old state while the change was being
    committed must not store it (the worker that would refresh may die)."""
    client = make_redis(settings.redis)
    cache = OrderCache(clean_db, client, 600)
    order_id = str(uuid.uuid4())
    assert _apply(Applier(clean_db), "PlaceOrder", make_place(order_id=order_id)).result is Result.APPLIED
    old = load_views(clean_db, [order_id])[order_id]
    cache.outdate({order_id: old["version"] + 1})  # a change of this order is being committed
    assert cache.get(order_id)["status"] == "pending"  # reads still answer, from PostgreSQL
    assert client.hget(KEY_PREFIX + order_id, "view") is None  # but the old state was not cached
    cache._store({order_id: {**old, "status": "cancelled", "version": old["version"] + 1}})
    assert json.loads(client.hget(KEY_PREFIX + order_id, "view"))["status"] == "cancelled"  # its commit's view is


def test_a_payment_change_alone_is_a_new_version_of_the_view(clean_db, settings, make_place):
    """A refund changes the payment, not the order's status: the cached view must still show it."""
    client = make_redis(settings.redis)
    cache = OrderCache(clean_db, client, 600)
    order_id = str(uuid.uuid4())
    applier = Applier(clean_db, views=cache)
    assert _apply(applier, "PlaceOrder", make_place(order_id=order_id)).result is Result.APPLIED
    confirm = {
        "order_id": order_id,
        "provider": "stripe",
        "payment_id": "pi_1",
        "amount": 300,
        "currency": "USD",
        "event_id": "evt_1",
    }
    assert _apply(applier, "PaymentConfirmed", confirm).result is Result.APPLIED
    before = cache.get(order_id)
    assert (before["status"], before["payment"]["status"]) == ("completed", "succeeded")
    with clean_db.begin() as conn:  # what the payment step's refund does: the payment alone changes
        uow = PostgresUnitOfWork(conn, "test")
        uow.preload([order_id], [])
        payment = uow.payment(order_id)
        payment.status = "refunded"
        uow.save_payment(payment)
        uow.flush()
        touched = uow.touched_versions
    assert touched.get(order_id, 0) > before["version"]
    cache.refresh(touched)
    assert cache.get(order_id)["payment"]["status"] == "refunded"
