"""The Redis read model in-process: a refresh never raises, never regresses, owes what it could not write.

The same through a running worker pool: ``tests/e2e/test_read_model_worker.py``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

import redis

from schema.topology import queue_of
from worker.commands import Applier
from worker.handled import Result
from worker.rabbit.connection import Delivery
from worker.read_model import KEY_PREFIX, OrderCache, load_views, make_redis
from worker.unit_of_work import PostgresUnitOfWork


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


def test_views_are_written_through_again_after_redis_forgot_its_scripts(clean_db, settings, make_place, private_redis):
    """The cache's scripts go by their SHA (no SCRIPT EXISTS round trip per pipeline); a Redis that forgot them
    (restarted, or SCRIPT FLUSH) is given them again, and nothing is lost or left stale."""
    client = redis.Redis(host="127.0.0.1", port=private_redis.port)
    cache = OrderCache(clean_db, client, 600)
    applier = Applier(clean_db, views=cache)
    order_id = str(uuid.uuid4())
    assert _apply(applier, "PlaceOrder", make_place(order_id=order_id)).result is Result.APPLIED
    assert cache.get(order_id)["status"] == "pending"  # read through and stored
    client.script_flush()
    cancel = {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}}
    assert _apply(applier, "CancelOrder", cancel).result is Result.APPLIED  # outdated, then refreshed
    cached = json.loads(client.hget(KEY_PREFIX + order_id, "view"))
    assert cached["status"] == "cancelled" and not cache._missed


def test_only_cached_views_are_written_through_and_an_unread_order_is_cached_by_its_first_read(
    clean_db, settings, make_place
):
    """A commit marks every changed order's view outdated, but writes through only the views that were
    cached: an order nobody read (the payment step's orders, as a rule) costs no view query and no write."""
    client = make_redis(settings.redis)
    cache = OrderCache(clean_db, client, 600)
    applier = Applier(clean_db, views=cache)
    unread, read = str(uuid.uuid4()), str(uuid.uuid4())
    for order_id in (unread, read):
        assert _apply(applier, "PlaceOrder", make_place(order_id=order_id)).result is Result.APPLIED
    assert cache.get(read)["status"] == "pending"  # read, so cached
    for order_id in (unread, read):
        cancel = {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}}
        assert _apply(applier, "CancelOrder", cancel).result is Result.APPLIED
    assert json.loads(client.hget(KEY_PREFIX + read, "view"))["status"] == "cancelled"  # written through
    assert client.hget(KEY_PREFIX + unread, "view") is None  # only the mark of the cancel's version
    version = int(client.hget(KEY_PREFIX + unread, "version"))
    assert cache.get(unread)["status"] == "cancelled"  # the first read caches it, at that version
    assert json.loads(client.hget(KEY_PREFIX + unread, "view"))["version"] == version
    # what the commit's outdate reports: the orders whose views were cached, to be written through
    assert cache.outdate({unread: version + 1, str(uuid.uuid4()): 1}) == {unread}
    assert not cache._missed
