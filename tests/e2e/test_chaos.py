"""The chaos run, short: about 1,000 orders through the real stack while workers and
the relay are SIGKILLed, RabbitMQ and PostgreSQL go away (behind cuttable proxies)
and a private Redis stops, with the payment fakes failing 20 % of calls.  Where a
RabbitMQ node of the test's own can run (root, rabbitmq-server installed), the run
uses one (``private_rabbit``) and raises a disk alarm on it too; the machine's shared
node never gets one.

It calls ``chaos.run`` of the ``scripts.chaos`` package itself (the same code
as the full run, ``python -m scripts.chaos``) with smaller numbers, on a
database and vhost of its own, and requires every check to pass.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the package lives in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from scripts import chaos, harness  # noqa: E402 - after the path is set

pytestmark = pytest.mark.skipif(
    not harness.have_rabbitmqctl() or shutil.which("redis-server") is None,
    reason="needs rabbitmqctl (own vhost) and redis-server (private Redis)",
)


def test_short_chaos_run_loses_nothing_and_applies_everything_once() -> None:
    run_id = os.environ.get("ORDERS_TEST_RUN_ID", str(os.getpid()))
    private = harness.can_run_private_rabbit() is None
    cfg = chaos.ChaosConfig.short(
        seed=int(os.environ.get("CHAOS_SEED", "5")),
        private_rabbit=private,
        database=f"orders_chaos_test_{run_id}",
        vhost=f"orders-chaos-test-{run_id}",
        drop_after=True,
    )

    result = chaos.run(cfg)

    failed = {c["name"]: c["problems"][:5] for c in result["checks"] if not c["ok"]}
    assert not failed, f"chaos checks violated (logs: {result['logs']}): {failed}"
    injected = {row[0]: int(row[2]) for row in result["injected"] if row[2].isdigit()}
    assert injected["SIGKILL worker process"] >= cfg.worker_kills
    assert injected["SIGKILL active relay"] >= cfg.relay_kills
    assert injected["RabbitMQ restart"] == injected["PostgreSQL restart"] == injected["Redis stopped"] == 1
    assert injected["orders placed"] == cfg.orders
    assert injected["malformed / hostile messages"] == cfg.malformed
    assert result["statuses"].get("completed", 0) > cfg.orders // 2
    if private:
        assert injected["RabbitMQ disk alarm"] == 1
    assert set(result["repeats"]) == {"extra_deliveries", "events", "orders"}
