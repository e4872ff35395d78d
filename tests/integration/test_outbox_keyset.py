"""The relay's keyset poll (issue 25): it skips what it published, and never a late-committing lower id."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from tests.support import dead_outbox_rows
from worker import relay as relay_module
from worker.rabbit.publisher import PipelinedPublisher
from worker.relay import FULL_POLL, POLL, Relay

_INSERT = text(
    "INSERT INTO outbox (event_id, exchange, routing_key, message_type, body)"
    " VALUES (CAST(:e AS uuid), 'inventory', 'stock.reserve', 'stock.reserve', '{}') RETURNING id"
)


@pytest.fixture
def publisher(settings: Any, bus: Any) -> Iterator[PipelinedPublisher]:
    """A publisher on the test vhost, whose topology ``bus`` declared (events land in its capture queue)."""
    p = PipelinedPublisher(settings.rabbitmq.url.get_secret_value()).connect()
    yield p
    p.close()


def insert(conn: Any) -> tuple[int, str]:
    event_id = str(uuid.uuid4())
    return conn.execute(_INSERT, {"e": event_id}).scalar_one(), event_id


def test_a_lower_id_that_commits_after_a_higher_one_was_published_is_published(settings, clean_db, bus, publisher):
    relay = Relay(settings, clean_db)
    assert relay.publish_pending(publisher, 100) == 0  # the session's first round: nothing yet
    late = clean_db.connect()
    try:
        tx = late.begin()
        low, low_event = insert(late)  # took its id, not committed yet
        with clean_db.begin() as conn:
            high, high_event = insert(conn)
        assert low < high
        assert relay.publish_pending(publisher, 100) == 1  # the higher id: the lower one is invisible
        for _ in range(3):  # rounds with nothing new, while the lower id's transaction stays open
            assert relay.publish_pending(publisher, 100) == 0
        assert relay.keyset.after < low, "the floor passed an id whose transaction is still open"
        tx.commit()
    finally:
        late.close()
    assert relay.publish_pending(publisher, 100) == 1, "the late-committing lower id was skipped"
    published = [e["message_id"] for e in bus.events()]
    assert published == [high_event, low_event]
    with clean_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM outbox")).scalar_one() == 0
    assert relay.publish_pending(publisher, 100) == 0
    assert relay.keyset.after >= low  # and once settled, the floor passes both


def test_a_full_batch_moves_the_floor_only_to_its_last_id(settings, clean_db, bus, publisher):
    relay = Relay(settings, clean_db)
    with clean_db.begin() as conn:
        ids = [insert(conn)[0] for _ in range(5)]
    assert relay.publish_pending(publisher, 2) == 2
    assert relay.keyset.after == ids[1]
    assert relay.publish_pending(publisher, 2) == 2
    assert relay.publish_pending(publisher, 2) == 1
    assert relay.keyset.after >= ids[4]
    assert len(bus.events()) == 5


def buffers(conn: Any, statement: Any, params: dict[str, Any]) -> int:
    """Shared buffers hit and read by one run of ``statement`` (EXPLAIN ANALYZE BUFFERS, its top node)."""
    sql = str(statement.compile(compile_kwargs={"literal_binds": False}))
    plan = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"), params).scalar_one()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    top = plan[0]["Plan"]
    return int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))


def test_the_poll_does_not_walk_the_rows_it_published(settings, clean_db, bus, publisher):
    """30,000 published and deleted rows, not vacuumed: the old poll walks their index entries, the new one not."""
    relay = Relay(settings, clean_db)
    with clean_db.begin() as conn:
        conn.execute(text("ALTER TABLE outbox SET (autovacuum_enabled = off)"))  # a lagging autovacuum, for sure
    try:
        dead_outbox_rows(clean_db, 30000)
        assert relay.publish_pending(publisher, 100) == 0
        with clean_db.begin() as conn:
            live, event = insert(conn)
        with clean_db.begin() as conn:
            _settled, start = relay.keyset.observe(conn)  # where its next poll starts
            new = buffers(conn, POLL, {"after": start, "limit": 100})
            old = buffers(conn, FULL_POLL, {"limit": 100})
        print(f"buffers: keyset poll {new}, full poll {old}")
        assert new <= 10 < 50 <= old, (new, old)
        assert relay.publish_pending(publisher, 100) == 1
        assert [e["message_id"] for e in bus.events()] == [event]
    finally:
        with clean_db.begin() as conn:
            conn.execute(text("ALTER TABLE outbox RESET (autovacuum_enabled)"))
        with clean_db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM outbox"))  # leave no dead rows to the tests after this one


def test_a_row_another_transaction_held_during_a_poll_is_published_once_it_lets_go(settings, clean_db, bus, publisher):
    """SKIP LOCKED passes over a row someone else holds (say a relay that lost its lock, not yet its transaction):
    if that one rolls back, the row is unpublished again, and the floor must not have passed it."""
    relay = Relay(settings, clean_db)
    with clean_db.begin() as conn:
        (held, held_event), (_next, after_event) = insert(conn), insert(conn)
    zombie = clean_db.connect()
    try:
        tx = zombie.begin()
        zombie.execute(text("SELECT id FROM outbox WHERE id = :i FOR UPDATE"), {"i": held})
        assert relay.publish_pending(publisher, 100) == 1  # the other one
        with clean_db.begin() as conn:
            later, later_event = insert(conn)
        assert relay.publish_pending(publisher, 100) == 1  # and the next: the floor moves on, up to the held row
        assert relay.keyset.after < held
        tx.rollback()  # it never published it
    finally:
        zombie.close()
    assert relay.publish_pending(publisher, 100) == 1, "the row skipped under SKIP LOCKED was never published"
    assert [e["message_id"] for e in bus.events()] == [after_event, later_event, held_event]
    assert relay.publish_pending(publisher, 100) == 0
    assert relay.keyset.after >= later


def test_the_relays_sessions_plan_without_bitmap_scans_and_no_one_elses(settings, clean_db):
    """Found by the soak: after a burst, the poll planned from statistics of a quiet moment became a
    bitmap scan of every unpublished row above the floor and a sort (108 ms against 3.6 ms in id order,
    and slower with every row that piled up meanwhile).  The relay's own sessions plan the poll in order;
    the setting stays on the relay's engine."""
    from worker import db

    engine = db.make_engine(settings.database, pool_size=1, pre_ping=False)
    try:
        Relay(settings, engine)
        Relay(settings, engine)  # a second relay on the engine (a test's) adds nothing twice
        with engine.begin() as conn:
            assert conn.execute(text("SHOW enable_bitmapscan")).scalar() == "off"
            assert conn.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
            conn.execute(POLL, {"after": 0, "limit": 10}).all()  # the poll runs as before
        other = db.make_engine(settings.database, pool_size=1)
        with other.connect() as conn:  # the worker's, the shim's: their reads by key keep bitmap scans
            assert conn.execute(text("SHOW enable_bitmapscan")).scalar() == "on"
        other.dispose()
    finally:
        engine.dispose()


class SlowConfirms:
    """The real publisher, whose confirms take ``delay`` seconds longer (a broker that holds up the round)."""

    def __init__(self, publisher: PipelinedPublisher, delay: float) -> None:
        self.publisher, self.delay = publisher, delay

    def publish_batch(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.delay)
        return self.publisher.publish_batch(*args, **kwargs)


def test_a_round_that_holds_up_publishing_is_logged_with_where_its_time_went(
    settings, clean_db, bus, publisher, monkeypatch
):
    monkeypatch.setattr(relay_module, "SLOW_ROUND_SECONDS", 0.25)
    relay = Relay(settings, clean_db)
    with clean_db.begin() as conn:
        insert(conn)
    with capture_logs() as fast:
        assert relay.publish_pending(publisher, 100) == 1
    assert [e for e in fast if e["event"] == "relay round slow"] == []
    with clean_db.begin() as conn:
        insert(conn)
        insert(conn)
    with capture_logs() as slow:
        assert relay.publish_pending(SlowConfirms(publisher, 0.4), 100) == 2  # type: ignore[arg-type]
    [warning] = [e for e in slow if e["event"] == "relay round slow"]
    assert warning["log_level"] == "warning" and warning["rows"] == 2
    assert warning["publish_ms"] >= 400 and warning["poll_ms"] < 250 and warning["seconds"] >= 0.4
    phases = warning["poll_ms"] + warning["publish_ms"] + warning["write_ms"] + warning["commit_ms"]
    assert abs(phases / 1000 - warning["seconds"]) < 0.01  # the phases are the whole round
    assert len(bus.events()) == 3
