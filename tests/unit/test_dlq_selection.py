"""Which dead letters an age filter selects, and how a letter without dead-letter headers is dated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.unit.recording_broker import delivery
from worker.dlq.letters import DeadLetter, format_age, parse_age
from worker.dlq.operations import Selection, undated_note

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def failed(ago: timedelta) -> DeadLetter:
    d = delivery(1, message_id="failed", headers={"x-last-failure-at": (NOW - ago).isoformat()})
    return DeadLetter.from_delivery(d)


def foreign(stamped_ago: timedelta | None) -> DeadLetter:
    """Published straight into the queue: no failure headers; a ``timestamp`` property, or none."""
    d = delivery(1, message_id="foreign")
    d.timestamp = int((NOW - stamped_ago).timestamp()) if stamped_ago is not None else None
    return DeadLetter.from_delivery(d)


def test_a_letter_without_failure_headers_is_dated_by_its_timestamp() -> None:
    dl = foreign(timedelta(minutes=10))
    assert (dl.landed_at, dl.dated_by) == (NOW - timedelta(minutes=10), "timestamp")
    assert Selection(newer_than=timedelta(hours=1)).matches(dl, NOW)
    assert not Selection(newer_than=timedelta(minutes=5)).matches(dl, NOW)
    assert Selection(older_than=timedelta(minutes=5)).matches(dl, NOW, undated=False)


def test_the_failure_time_comes_before_the_timestamp() -> None:
    d = delivery(1, headers={"x-last-failure-at": (NOW - timedelta(days=3)).isoformat()})
    d.timestamp = int(NOW.timestamp())  # when the command was first published: not when it died
    dl = DeadLetter.from_delivery(d)
    assert (dl.landed_at, dl.dated_by) == (NOW - timedelta(days=3), "failure")


@pytest.mark.parametrize("age", [Selection(older_than=timedelta(days=1)), Selection(newer_than=timedelta(hours=1))])
def test_a_letter_with_no_time_is_kept_or_left_as_the_caller_says_never_judged_by_an_age(age: Selection) -> None:
    dl = foreign(None)
    assert (dl.landed_at, dl.dated_by) == (None, None)
    assert age.matches(dl, NOW) and not age.matches(dl, NOW, undated=False)
    assert age.undated([dl, failed(timedelta(minutes=1))]) == [dl]


def test_without_an_age_filter_a_letter_with_no_time_is_just_a_letter() -> None:
    dl = foreign(None)
    assert Selection(everything=True).matches(dl, NOW, undated=False)
    assert Selection(everything=True).undated([dl]) == []


def test_the_other_filters_still_apply_to_a_letter_with_no_time() -> None:
    dl = foreign(None)
    assert not Selection(types=("CancelOrder",), older_than=timedelta(days=1)).matches(dl, NOW)
    assert Selection(types=("CancelOrder",), older_than=timedelta(days=1)).undated([dl]) == []


def test_the_note_names_the_filter_and_the_letters() -> None:
    sel = Selection(newer_than=timedelta(hours=1))
    assert undated_note(sel, [], kept=True) is None
    kept = undated_note(sel, ["a", "b"], kept=True)
    assert kept is not None and kept.startswith("2 dead letter(s) carry no time") and "--newer-than 1h" in kept
    assert kept.endswith("included, as their age is unknown: a, b")
    left = undated_note(Selection(older_than=timedelta(days=30)), [f"m{i}" for i in range(7)], kept=False)
    assert left is not None and "--older-than 30d" in left and "name them by id" in left and "(+2)" in left


@pytest.mark.parametrize("text", ["90s", "15m", "2h", "3d", "1w", "36h", "1.5s"])
def test_format_age_reads_back_as_the_same_age(text: str) -> None:
    assert parse_age(format_age(parse_age(text))) == parse_age(text)
    assert format_age(parse_age("90")) == "90s" and format_age(parse_age("36h")) == "36h"
