"""The chaos run's read-model check: views must agree with PostgreSQL, and must exist whenever a buyer read an
order after Redis came back empty; a run whose reads all came before the outage has none to compare."""

from __future__ import annotations

from types import SimpleNamespace

from scripts.chaos.checks import check_read_model


def facts(views: dict[str, str], read_at: float | None, redis_back_at: float | None) -> SimpleNamespace:
    orders = {"o1": {"status": "completed"}, "o2": {"status": "cancelled"}}
    return SimpleNamespace(
        snap=SimpleNamespace(read_model=views, orders=orders),
        ledger=SimpleNamespace(last_view_at=read_at),
        injector=SimpleNamespace(redis_back_at=redis_back_at),
    )


def test_no_view_after_a_read_since_redis_came_back_is_a_violation():
    check = check_read_model(facts({}, read_at=20.0, redis_back_at=10.0))
    assert not check.ok and "after Redis came back" in check.problems[0]


def test_no_view_after_a_read_with_no_outage_is_a_violation():
    assert not check_read_model(facts({}, read_at=5.0, redis_back_at=None)).ok


def test_no_view_when_every_read_came_before_redis_came_back_empty_is_said_not_failed():
    check = check_read_model(facts({}, read_at=5.0, redis_back_at=10.0))
    assert check.ok and check.detail == "no views to compare: no buyer read an order after Redis came back"
    assert check_read_model(facts({}, read_at=None, redis_back_at=None)).ok


def test_a_stale_view_is_a_violation_and_current_ones_pass():
    stale = check_read_model(facts({"o1": "completed", "o2": "pending"}, read_at=20.0, redis_back_at=10.0))
    assert not stale.ok and stale.problems == ["order o2: cached pending, PostgreSQL cancelled"]
    current = check_read_model(facts({"o1": "completed", "o2": "cancelled"}, read_at=20.0, redis_back_at=10.0))
    assert current.ok and current.detail == "2 cached views, all current"
