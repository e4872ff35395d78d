"""``orders dlq`` age filters and dead letters without dead-letter headers (issue 24, item 2).

A message can reach ``orders.dead-letter`` without passing through a worker
(published to it by hand, moved by a shovel): no ``x-*-failure-at``, no
``x-death``.  ``--older-than``/``--newer-than`` date it by its ``timestamp``
property; with no time at all, ``list``, ``export`` and ``replay`` include it
and ``purge`` leaves it, and each says so on stderr.  Against the real
RabbitMQ, in the test's vhost, through the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika

ORDERS = str(Path(sys.executable).parent / "orders")
DLQ = "orders.dead-letter"


def orders(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([ORDERS, "dlq", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def failed_at(bus: Any, ago: timedelta) -> str:
    """A letter a worker dead-lettered ``ago``."""
    message_id = f"failed-{uuid.uuid4()}"
    when = datetime.now(UTC) - ago
    headers = {
        "x-original-exchange": "orders.commands",
        "x-original-routing-key": "order.place",
        "x-original-queue": "orders.place",
        "x-first-failure-at": (when - timedelta(seconds=3)).isoformat(),
        "x-last-failure-at": when.isoformat(),
        "x-attempts": 3,
        "x-error-class": "InvalidMessage",
        "x-error-message": "body.user_id: Field required",
    }
    props = pika.BasicProperties(message_id=message_id, type="PlaceOrder", delivery_mode=2, headers=headers)
    bus.ch.basic_publish("orders.dlx", "orders.place", b"{}", props)
    return message_id


def straight_in(bus: Any, timestamp: datetime | None) -> str:
    """A message published straight into the dead-letter queue: no dead-letter headers at all."""
    message_id = f"foreign-{uuid.uuid4()}"
    props = pika.BasicProperties(
        message_id=message_id,
        type="PlaceOrder",
        delivery_mode=2,
        timestamp=int(timestamp.timestamp()) if timestamp else None,
    )
    bus.ch.basic_publish("", DLQ, b'{"user_id": "u-1"}', props)
    return message_id


def seed(bus: Any, wait: Any) -> dict[str, str]:
    ids = {
        "old": failed_at(bus, timedelta(days=2)),
        "recent": failed_at(bus, timedelta(minutes=1)),
        "stamped": straight_in(bus, datetime.now(UTC) - timedelta(minutes=10)),
        "bare": straight_in(bus, None),
    }
    wait(lambda: bus.depth(DLQ) == 4, timeout=10, what="the dead letters to land")
    return ids


def listed(env: dict[str, str], *filters: str) -> tuple[dict[str, dict[str, Any]], str]:
    done = orders(env, "list", "--json", *filters)
    return {row["id"]: row for row in json.loads(done.stdout)}, done.stderr


def test_export_newer_than_dates_a_letter_by_its_timestamp_and_keeps_one_with_no_time_saying_so(
    bus: Any, test_env: dict[str, str], wait: Any, tmp_path: Path
) -> None:
    ids = seed(bus, wait)
    out = tmp_path / "recent.jsonl"
    done = orders(test_env, "export", str(out), "--newer-than", "1h")
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["id"] for row in exported} == {ids["recent"], ids["stamped"], ids["bare"]}
    assert "exported 3 message(s)" in done.stdout
    note = " ".join(done.stderr.split())  # rich folds long lines
    assert "1 dead letter(s) carry no time" in note and "--newer-than 1h cannot date them" in note
    assert ids["bare"] in note and "included" in note
    by_id = {row["id"]: row for row in exported}
    assert by_id[ids["stamped"]]["dated_by"] == "timestamp"
    assert by_id[ids["bare"]]["landed_at"] is None and by_id[ids["bare"]]["dated_by"] is None
    assert bus.depth(DLQ) == 4  # an export changes nothing


def test_list_filters_by_the_timestamp_and_names_what_it_cannot_date(
    bus: Any, test_env: dict[str, str], wait: Any
) -> None:
    ids = seed(bus, wait)
    older, note = listed(test_env, "--older-than", "1d")
    assert set(older) == {ids["old"], ids["bare"]}
    assert ids["bare"] in " ".join(note.split())
    newer, _ = listed(test_env, "--newer-than", "30m")
    assert set(newer) == {ids["recent"], ids["stamped"], ids["bare"]}
    assert newer[ids["stamped"]]["dated_by"] == "timestamp" and newer[ids["recent"]]["dated_by"] == "failure"
    between, _ = listed(test_env, "--newer-than", "5m")
    assert set(between) == {ids["recent"], ids["bare"]}  # the stamped one is 10 minutes old
    everything, quiet = listed(test_env)
    assert len(everything) == 4 and "carry no time" not in quiet  # no age filter: nothing to say


def test_replay_selects_what_list_shows_and_purge_never_goes_by_an_age_it_cannot_know(
    bus: Any, clean_db: Any, test_env: dict[str, str], wait: Any
) -> None:
    ids = seed(bus, wait)
    dry = orders(test_env, "replay", "--newer-than", "1h", "--dry-run", "--json")
    report = json.loads(dry.stdout)
    assert set(report["ids"]) == {ids["recent"], ids["stamped"], ids["bare"]}
    assert report["undated"] == [ids["bare"]] and ids["bare"] in " ".join(dry.stderr.split())

    purged = orders(test_env, "purge", "--older-than", "1d", "--yes", "--json")
    assert json.loads(purged.stdout)["moved"] == [ids["old"]]
    assert json.loads(purged.stdout)["undated"] == [ids["bare"]]
    note = " ".join(purged.stderr.split())
    assert ids["bare"] in note and "left in the queue" in note
    left, _ = listed(test_env)
    assert set(left) == {ids["recent"], ids["stamped"], ids["bare"]}
