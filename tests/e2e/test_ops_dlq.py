"""``orders dlq``: dead letters listed without loss, replayed exactly once, purged with an audit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import text

from scripts.harness import Proc

ORDERS = str(Path(sys.executable).parent / "orders")
DLQ = "orders.dead-letter"


def orders(
    env: dict[str, str], *args: str, stdin: str = "", timeout: float = 180, **extra: str
) -> subprocess.CompletedProcess[str]:
    """Run the real ``orders`` CLI."""
    return subprocess.run(
        [ORDERS, *args], env={**env, **extra}, input=stdin, capture_output=True, text=True, timeout=timeout
    )


def listed(env: dict[str, str], *filters: str) -> list[dict[str, Any]]:
    done = orders(env, "dlq", "list", "--json", *filters)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def scalar(engine: Any, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def status_of(engine: Any, order_id: str) -> str | None:
    return scalar(engine, "SELECT status FROM orders WHERE order_id = CAST(:o AS uuid)", o=order_id)


def cancel_body(order_id: str, user: str = "user-1") -> dict[str, Any]:
    return {"order_id": order_id, "requested_by": {"user_id": user, "roles": ["user"]}, "reason": "changed my mind"}


def seed_dead_letters(
    bus: Any,
    bodies: list[tuple[str, str, bytes]],
    error_class: str = "OperationalError",
    queue: str = "orders.place",
    key: str = "order.place",
) -> None:
    """Publish (message_id, type, body) straight to the dead-letter exchange, as a worker would."""
    headers = {
        "x-original-exchange": "orders.commands",
        "x-original-routing-key": key,
        "x-original-queue": queue,
        "x-first-failure-at": "2025-01-01T00:00:00+00:00",
        "x-last-failure-at": "2025-01-01T00:00:03+00:00",
        "x-attempts": 3,
        "x-error-class": error_class,
        "x-error-message": "server closed the connection",
        "x-error-digest": "0123456789abcdef",
        "x-error-traceback": "Traceback (most recent call last): ...",
    }
    for message_id, message_type, body in bodies:
        bus.ch.basic_publish(
            "orders.dlx",
            queue,
            body,
            pika.BasicProperties(
                message_id=message_id,
                type=message_type,
                content_type="application/json",
                delivery_mode=2,
                headers=headers,
            ),
        )


def settled(
    bus: Any, queues: tuple[str, ...] = ("orders.place", "orders.cancel", "orders.delay.1s", "orders.delay.2s")
) -> bool:
    """Nothing left in flight: work and delay queues empty, the dead-letter queue no longer growing."""
    before = bus.depth(DLQ)
    time.sleep(0.5)
    return all(bus.depth(q) == 0 for q in queues) and bus.depth(DLQ) == before


@pytest.fixture
def worker(service: Any, bus: Any, clean_db: Any, commands_only: list[str]) -> Any:
    return service("worker", "--processes", "1", *commands_only)


def test_poison_and_permanently_failing_messages_are_listed_with_their_reasons(
    worker, bus, clean_db, wait, make_place, test_env
):
    poison = bus.publish("PlaceOrder", b'{"user_id": "user-1", "items": "lots"}')
    never_placed = str(uuid.uuid4())
    failing = bus.publish("CancelOrder", cancel_body(never_placed))
    unknown = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(items=[("sku-nope", 1)], order_id=unknown))
    # the cancel goes through the delay tiers [1, 2]s before it is dead-lettered
    wait(
        lambda: {m["message_id"] for m in bus.dead_letters()} == {poison, failing}, timeout=30, what="two dead letters"
    )
    wait(lambda: settled(bus), what="no retries in flight")

    letters = {dl["id"]: dl for dl in listed(test_env)}
    assert set(letters) == {poison, failing}
    assert letters[poison]["error_class"] == "InvalidMessage"
    assert "items" in letters[poison]["error_message"]
    assert (letters[poison]["original_queue"], letters[poison]["attempts"]) == ("orders.place", 1)
    assert letters[failing]["error_class"] == "RetryLater"
    assert "not placed yet" in letters[failing]["error_message"]
    assert (letters[failing]["original_queue"], letters[failing]["attempts"]) == ("orders.cancel", 3)
    assert letters[failing]["original_routing_key"] == "order.cancel"
    # an unknown product is a business outcome, not a dead letter
    wait(lambda: status_of(clean_db, unknown) == "rejected", what="rejected order")

    assert {dl["id"] for dl in listed(test_env, "--type", "CancelOrder")} == {failing}
    assert [dl["id"] for dl in listed(test_env, "--error", "InvalidMessage")] == [poison]
    assert {dl["id"] for dl in listed(test_env, "--queue", "orders.cancel")} == {failing}
    assert listed(test_env, "--older-than", "1h") == []
    depth = bus.depth(DLQ)
    assert len(listed(test_env, "--newer-than", "1h")) == depth
    # listing neither consumes nor reorders
    assert [m["message_id"] for m in bus.dead_letters()] == [dl["id"] for dl in listed(test_env)]
    assert bus.depth(DLQ) == depth


def test_a_permanently_failing_message_is_dead_lettered_once(worker, bus, clean_db, wait, test_env):
    failing = bus.publish("CancelOrder", cancel_body(str(uuid.uuid4())))
    wait(lambda: bus.depth(DLQ) >= 1, timeout=30, what="the dead letter")
    wait(lambda: settled(bus), what="no retries in flight")
    assert [dl["id"] for dl in listed(test_env)] == [failing]


def test_replay_after_the_order_exists_applies_the_command_exactly_once(
    worker, bus, clean_db, wait, make_place, test_env
):
    order_id = str(uuid.uuid4())
    cancel = bus.publish("CancelOrder", cancel_body(order_id))  # its order is not placed yet
    wait(lambda: bus.depth(DLQ) >= 1, timeout=30, what="the cancel in the dead-letter queue")
    wait(lambda: settled(bus), what="no retries in flight")
    copies = bus.depth(DLQ)
    assert copies == 1

    dry = orders(test_env, "dlq", "replay", cancel, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert set(json.loads(dry.stdout)["ids"]) == {cancel} and json.loads(dry.stdout)["moved"] == []
    assert bus.depth(DLQ) == copies

    bus.publish("PlaceOrder", make_place(order_id=order_id))
    wait(lambda: status_of(clean_db, order_id) == "pending", what="order placed")
    shown = json.loads(orders(test_env, "dlq", "show", cancel, "--json").stdout)
    assert shown["order_facts"]["order"]["status"] == "pending"
    assert shown["order_facts"]["already_applied"] is False
    assert shown["traceback"] is None and shown["body"]["order_id"] == order_id

    done = orders(test_env, "dlq", "replay", cancel, "--actor", "alice")
    assert done.returncode == 0, done.stderr
    wait(lambda: status_of(clean_db, order_id) == "cancelled", what="order cancelled by the replay")
    assert bus.depth(DLQ) == 0

    # the same message again (a replay that ran twice) changes nothing
    bus.publish("CancelOrder", cancel_body(order_id), message_id=cancel)
    marker = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=marker))
    wait(lambda: status_of(clean_db, marker) == "pending", what="a later command")
    other = bus.publish("CancelOrder", cancel_body(marker))
    wait(lambda: status_of(clean_db, marker) == "cancelled", what="the cancel queued after the duplicate")
    assert (
        scalar(
            clean_db,
            "SELECT count(*) FROM order_transitions WHERE order_id = CAST(:o AS uuid) AND to_status = 'cancelled'",
            o=order_id,
        )
        == 1
    )
    assert (
        scalar(
            clean_db,
            "SELECT count(*) FROM outbox WHERE order_id = CAST(:o AS uuid) AND routing_key = 'order.cancelled'",
            o=order_id,
        )
        == 1
    )
    assert other and bus.depth(DLQ) == 0

    history = json.loads(orders(test_env, "dlq", "history", "--json").stdout)
    assert [(h["action"], h["actor"], h["message_ids"]) for h in history] == [("replay", "alice", [cancel] * copies)]
    assert history[0]["detail"].startswith(f"replayed {copies} of {copies}")


def test_replay_to_a_queue_keeps_the_message_id_and_resets_the_failure_headers(bus, clean_db, test_env):
    body = json.dumps(
        {
            "user_id": "user-1",
            "product_id": "sku-apple",
            "quantity": 1,
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
        }
    ).encode()
    seed_dead_letters(bus, [("keep-me", "PlaceOrder", body), ("stay", "PlaceOrder", body)])
    bus.ch.queue_declare("test.replayed", durable=True, arguments={"x-queue-type": "quorum"})
    bus.ch.queue_purge("test.replayed")

    nowhere = orders(test_env, "dlq", "replay", "keep-me", "--to", "test.no-such-queue")
    assert nowhere.returncode == 1 and "not replayed" in nowhere.stderr
    assert [m["message_id"] for m in bus.dead_letters()] == ["keep-me", "stay"]  # unroutable: kept, in order

    done = orders(test_env, "dlq", "replay", "keep-me", "--to", "test.replayed", USER="bob")
    assert done.returncode == 0, done.stderr
    method, props, got = bus.ch.basic_get("test.replayed", auto_ack=True)
    assert method is not None and got == body
    assert (props.message_id, props.type, props.delivery_mode) == ("keep-me", "PlaceOrder", 2)
    assert props.headers["x-replayed-by"] == "bob" and "x-replayed-at" in props.headers
    assert props.headers["x-replay-count"] == 1
    assert not {"x-attempts", "x-error-class", "x-original-queue", "x-first-failure-at"} & set(props.headers)
    assert props.headers.get("x-delivery-count", 0) == 0  # (the quorum queue adds its own, starting again at 0)
    assert [m["message_id"] for m in bus.dead_letters()] == ["stay"]
    bus.ch.queue_delete("test.replayed")


def test_replay_never_sends_a_command_to_a_queue_that_does_not_take_it(bus, clean_db, test_env):
    """A queue accepts only its own command: replaying a misrouted PlaceOrder where it was would only
    dead-letter it again, so it stays until it is replayed to orders.place."""
    body = json.dumps(
        {
            "user_id": "user-1",
            "product_id": "sku-apple",
            "quantity": 1,
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
        }
    ).encode()
    seed_dead_letters(
        bus,
        [("misrouted", "PlaceOrder", body)],
        error_class="InvalidMessage",
        queue="orders.cancel",
        key="order.cancel",
    )

    for target in ([], ["--to", "orders.cancel"]):
        refused = orders(test_env, "dlq", "replay", "misrouted", *target)
        said = " ".join(refused.stderr.split())  # (rich wraps the line)
        assert refused.returncode == 1 and "does not belong on queue 'orders.cancel'" in said
        assert "replay it with --to orders.place" in said
        assert [m["message_id"] for m in bus.dead_letters()] == ["misrouted"]
    assert bus.depth("orders.cancel") == 0

    done = orders(test_env, "dlq", "replay", "misrouted", "--to", "orders.place")
    assert done.returncode == 0, done.stderr
    assert bus.depth("orders.place") == 1 and bus.dead_letters() == []


def test_replay_with_edit_validates_the_body_before_anything_moves(worker, bus, clean_db, wait, tmp_path, test_env):
    order_id = str(uuid.uuid4())
    broken = json.dumps(
        {
            "order_id": order_id,
            "user_id": "user-1",
            "items": [{"product_id": "sku-pear", "quantity": "two"}],
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
        }
    )
    message_id = bus.publish("PlaceOrder", broken.encode())
    wait(lambda: bus.depth(DLQ) == 1, what="the poison message in the dead-letter queue")

    garbage = tmp_path / "garbage.py"
    garbage.write_text("import sys; open(sys.argv[1], 'w').write('{\"user_id\": 1}')\n")
    bad = orders(test_env, "dlq", "replay", message_id, "--edit", EDITOR=f"{sys.executable} {garbage}")
    assert bad.returncode == 1 and "not a valid PlaceOrder" in bad.stderr
    assert bus.depth(DLQ) == 1 and status_of(clean_db, order_id) is None

    fix = tmp_path / "fix.py"
    fix.write_text("import sys; p = sys.argv[1]; s = open(p).read(); open(p, 'w').write(s.replace('\"two\"', '2'))\n")
    good = orders(test_env, "dlq", "replay", message_id, "--edit", EDITOR=f"{sys.executable} {fix}")
    assert good.returncode == 0, good.stderr
    wait(lambda: status_of(clean_db, order_id) == "pending", what="the edited order placed")
    assert scalar(clean_db, "SELECT total FROM orders WHERE order_id = CAST(:o AS uuid)", o=order_id) == 2 * 275
    assert bus.depth(DLQ) == 0
    assert "body edited" in json.loads(orders(test_env, "dlq", "history", "--json").stdout)[0]["detail"]


def test_purge_asks_first_exports_and_is_audited(bus, clean_db, tmp_path, test_env):
    body = b'{"order_id": "not-a-uuid"}'
    seed_dead_letters(bus, [("p-1", "PlaceOrder", body), ("p-2", "PlaceOrder", body)])
    seed_dead_letters(bus, [("c-1", "CancelOrder", body)], "RetryLater", "orders.cancel", "order.cancel")

    assert orders(test_env, "dlq", "purge").returncode == 2  # no selection: usage error
    declined = orders(test_env, "dlq", "purge", "--type", "PlaceOrder", stdin="n\n")
    assert declined.returncode == 1 and "Purge 2 dead letter(s)" in declined.stderr
    assert bus.depth(DLQ) == 3

    exported = tmp_path / "all.jsonl"
    assert orders(test_env, "dlq", "export", str(exported)).returncode == 0
    assert [json.loads(line)["id"] for line in exported.read_text().splitlines()] == ["p-1", "p-2", "c-1"]

    saved = tmp_path / "purged.jsonl"
    done = orders(test_env, "dlq", "purge", "--type", "PlaceOrder", "--export", str(saved), stdin="y\n", USER="carol")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [(d["id"], d["body"], d["error_class"]) for d in lines] == [
        ("p-1", {"order_id": "not-a-uuid"}, "OperationalError"),
        ("p-2", {"order_id": "not-a-uuid"}, "OperationalError"),
    ]
    assert [m["message_id"] for m in bus.dead_letters()] == ["c-1"]
    history = json.loads(orders(test_env, "dlq", "history", "--json").stdout)
    assert [(h["action"], h["actor"], h["message_ids"]) for h in history] == [("purge", "carol", ["p-1", "p-2"])]
    assert orders(test_env, "dlq", "purge", "--all", "--yes").returncode == 0
    assert bus.depth(DLQ) == 0


def test_broker_dead_lettered_messages_are_explained_from_x_death() -> None:
    from datetime import datetime

    from worker.dlq.letters import DeadLetter, replay_headers
    from worker.rabbit.connection import Delivery

    when = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    d = Delivery(
        1,
        "orders.dlx",
        "order.place",
        DLQ,
        b"{}",
        "m-1",
        "PlaceOrder",
        None,
        None,
        "application/json",
        {
            "x-death": [
                {
                    "count": 1,
                    "reason": "delivery_limit",
                    "queue": "orders.place",
                    "time": when,
                    "exchange": "orders.commands",
                    "routing-keys": ["order.place"],
                }
            ],
            "x-first-death-reason": "delivery_limit",
            "x-delivery-count": 21,
        },
        False,
    )
    dl = DeadLetter.from_delivery(d)
    assert (dl.error_class, dl.dead_lettered_by, dl.destination) == (
        "DeliveryLimitExceeded",
        "broker",
        ("orders.commands", "order.place"),
    )
    assert dl.original_queue == "orders.place" and dl.last_failure_at == when
    assert not {"x-death", "x-first-death-reason", "x-delivery-count"} & set(replay_headers(d, when, "me"))
    # delay-tier history ("expired") is not the cause: the worker's headers are
    d.headers = {
        "x-death": [{"reason": "expired", "queue": "orders.delay.2s", "count": 1}],
        "x-error-class": "RetryLater",
        "x-attempts": 3,
        "x-original-queue": "orders.cancel",
    }
    assert (DeadLetter.from_delivery(d).error_class, DeadLetter.from_delivery(d).dead_lettered_by) == (
        "RetryLater",
        "worker",
    )


@pytest.mark.timeout(600)
def test_replay_of_5000_killed_halfway_loses_nothing_and_applies_each_once(
    worker, bus, clean_db, wait, make_place, test_env, tmp_path
):
    total = 5000
    ids = [f"bulk-{i:05d}" for i in range(total)]
    seed_dead_letters(
        bus, [(mid, "PlaceOrder", json.dumps(make_place(user=f"user-{i % 50}")).encode()) for i, mid in enumerate(ids)]
    )
    wait(lambda: bus.depth(DLQ) == total, what="5,000 dead letters")

    def applied() -> int:
        return scalar(clean_db, "SELECT count(*) FROM orders")

    run = Proc.orders(["dlq", "replay", "--all", "--rate", "1000"], test_env, tmp_path / "replay.log")
    wait(lambda: applied() >= total * 0.3, timeout=60, interval=0.02, what="a third replayed")
    run.kill_group()

    def settled() -> bool:  # the broker has the killed run's messages back; the worker drained the rest
        before = applied()
        time.sleep(1.0)
        return bus.depth("orders.place") == 0 and applied() == before and bus.depth(DLQ) > 0

    wait(settled, timeout=60, what="the worker to drain")
    placed = {r[0] for r in clean_db.connect().execute(text("SELECT place_message_id FROM orders"))}
    waiting = [m["message_id"] for m in bus.dead_letters()]
    assert 0 < len(placed) < total
    assert placed | set(waiting) == set(ids), "a dead letter was lost"
    assert len(waiting) == len(set(waiting)), "a dead letter was duplicated in the queue"
    # a message may be both applied and still dead-lettered (confirmed, not yet acked): at most a handful
    assert len(placed & set(waiting)) <= 5

    again = orders(test_env, "dlq", "replay", "--all")
    assert again.returncode == 0, again.stderr
    wait(lambda: applied() == total, timeout=120, what="every order placed")
    assert bus.depth(DLQ) == 0
    assert scalar(clean_db, "SELECT count(*) FROM order_transitions WHERE to_status = 'pending'") == total
    assert scalar(clean_db, "SELECT count(*) FROM outbox WHERE routing_key = 'stock.reserve'") == total
    assert scalar(clean_db, "SELECT count(*) FROM inbox WHERE message_id LIKE 'bulk-%'") == total
    history = json.loads(orders(test_env, "dlq", "history", "--json").stdout)
    assert [h["action"] for h in history] == ["replay", "replay"]
    assert history[1]["detail"].startswith("started:")  # the killed run never finished its audit row
    assert len(history[1]["message_ids"]) == total
