"""``scripts/bench_paid.py --stages``: an order's latency split at the moments the database and broker show."""

from __future__ import annotations

import math

from scripts.bench_paid import STAGES, stages


def test_each_stage_is_the_time_between_its_two_moments_over_the_judged_orders_that_passed_them_all() -> None:
    due = {"a": 10.0, "b": 11.0, "warm": 1.0, "lost": 12.0}
    placed = {"a": 10.010, "b": 11.030, "warm": 1.5, "lost": 12.1}
    start = {"a": 10.060, "b": 11.130, "warm": 1.6}  # "lost" never got its payment.start published
    completed = {"a": 10.160, "b": 11.330, "warm": 1.7}
    event = {"a": 10.200, "b": 11.430, "warm": 1.8}
    out = stages(due, 10.0, placed, start, completed, event)  # "warm" is before the judged window
    assert list(out) == [name for name, _, _ in STAGES]
    by_stage = [(v["orders"], round(v["p50_ms"], 3), round(v["p90_ms"], 3)) for v in out.values()]
    assert by_stage == [(2, 20.0, 28.0), (2, 75.0, 95.0), (2, 150.0, 190.0), (2, 70.0, 94.0)]


def test_no_order_that_passed_every_moment_gives_no_figure() -> None:
    out = stages({"a": 1.0}, 0.0, {"a": 1.1}, {}, {}, {})
    assert all(v["orders"] == 0 and math.isnan(v["p50_ms"]) for v in out.values())
