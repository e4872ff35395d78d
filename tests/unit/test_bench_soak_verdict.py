"""The soak's verdict (scripts/bench_soak.py): bounded backlog, flat RSS, flat relay poll, over synthetic samples."""

from __future__ import annotations

import argparse
from typing import Any

from scripts.bench_soak import judge

ARGS = argparse.Namespace(backlog_seconds=10.0, rss_tolerance=10.0, poll_tolerance=50.0)
RATE = 50.0


def rows(
    in_flight: Any = lambda t: 20, rss: Any = lambda t: 100.0, poll_ms: Any = lambda t: 2.0, buffers: Any = lambda t: 30
) -> list[dict[str, Any]]:
    """One sample every 5 s over 10 minutes."""
    return [
        {
            "t_s": float(t),
            "in_flight": in_flight(t),
            "rss_mib": {"worker": rss(t), "relay": 60.0, "shim": 200.0},
            "poll_ms": poll_ms(t),
            "poll_buffers": buffers(t),
        }
        for t in range(5, 601, 5)
    ]


def test_a_steady_run_passes() -> None:
    v = judge(rows(), RATE, ARGS, minutes=10)
    assert v["ok"] and v["backlog"]["bounded"] and v["poll"]["flat"]
    assert all(r["flat"] for r in v["rss"].values())


def test_a_growing_backlog_is_not_bounded_even_under_the_peak_limit() -> None:
    # 2 orders more in flight every 5 s: 240 at the end, under the 500 of 10 s of load, but growing
    v = judge(rows(in_flight=lambda t: 2 * t // 5), RATE, ARGS, minutes=10)
    assert not v["backlog"]["bounded"] and not v["ok"]
    assert v["backlog"]["peak"] < ARGS.backlog_seconds * RATE


def test_rss_that_grows_a_fifth_is_not_flat_and_warm_up_growth_is_not_judged() -> None:
    assert not judge(rows(rss=lambda t: 100.0 + t / 20), RATE, ARGS, minutes=10)["rss"]["worker"]["flat"]
    # growth during the first minute (the warm-up) only
    v = judge(rows(rss=lambda t: 100.0 if t >= 60 else 50.0 + t), RATE, ARGS, minutes=10)
    assert v["rss"]["worker"]["flat"]


def test_a_poll_that_visits_more_and_more_buffers_is_not_flat_even_when_it_stays_fast() -> None:
    assert not judge(rows(poll_ms=lambda t: 2.0 + t / 20), RATE, ARGS, minutes=10)["poll"]["flat"]
    assert not judge(rows(buffers=lambda t: 30 + t), RATE, ARGS, minutes=10)["poll"]["flat"]
    assert judge(rows(poll_ms=lambda t: 2.0 + (t % 10) / 20), RATE, ARGS, minutes=10)["poll"]["flat"]


def test_too_short_a_run_says_so() -> None:
    assert "error" in judge(rows()[:3], RATE, ARGS, minutes=10)
