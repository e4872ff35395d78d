"""The run's settings (:class:`ChaosConfig`), what its modules share, its error and its log line."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the repository (this package is scripts/chaos/)
ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "config" / "products.demo.json"
CAPTURE_QUEUE = "chaos.capture"
JWT_SECRET = "chaos-run-jwt-secret-of-at-least-32-bytes"
HMAC_SECRET = "chaos-run-internal-webhook-secret"


class ChaosError(Exception):
    """The run cannot be carried out (setup failed, no quiescence, deadline)."""


def say(*args: Any) -> None:
    """A progress line on stderr (stdout is the report's)."""
    print(f"[chaos {time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


@dataclass
class ChaosConfig:
    """One run: its seed and size, what it injects, and its time limits (defaults: the full run)."""

    seed: int = 1
    orders: int = 10_000
    #: restart the machine's RabbitMQ, PostgreSQL and Redis instead of cutting proxies
    real_restarts: bool = False
    #: "single" (the machine's servers behind proxies) or "cluster" (scripts/cluster.sh: three RabbitMQ
    #: nodes, a PostgreSQL primary with a synchronous standby; nodes stopped, the primary failed over)
    topology: str = "single"
    #: single topology: a RabbitMQ node of the run's own (``scripts.harness.RabbitNode``, root) behind the proxy
    #: instead of the machine's shared node; with it (and on a cluster) the run also raises a disk alarm
    private_rabbit: bool = False
    #: shortest load window (seconds); None: 150 on a cluster (its faults take minutes), else 20
    min_window: float | None = None
    database: str = "orders_chaos"
    vhost: str = "orders-chaos"
    #: orders offered per second (the load window is orders / rate)
    rate: float = 60.0
    malformed: int = 1000
    worker_kills: int = 20
    relay_kills: int = 5
    processes: int = 2
    fault_rate: float = 0.20
    rabbit_outage_s: float = 8.0
    postgres_outage_s: float = 8.0
    redis_outage_s: float = 15.0
    #: how long the disk alarm lasts: longer than the relay's 30 s confirm timeout, which it must wait out
    alarm_s: float = 40.0
    shim_share: float = 0.15
    cancel_share: float = 0.12
    retry_delays: tuple[int, ...] = (1, 3, 10, 30)
    payment_concurrency: int = 16
    #: orders.payment_timeout_minutes of the run: abandoned orders expire after it (0: none expires); long
    #: enough that a buyer who pays does so in time through the outages and kills
    payment_timeout_minutes: float = 2.0
    #: seconds allowed for reaching quiescence after the load
    quiesce_timeout: float = 900.0
    #: seconds allowed for the whole run
    timeout: float = 3600.0
    #: drop the database and the vhost at the end (the test suite does)
    drop_after: bool = False
    keep_logs: bool = False

    @classmethod
    def short(cls, **overrides: Any) -> ChaosConfig:
        """The test suite's variant: about 1,000 orders and a few kills."""
        values: dict[str, Any] = {
            "orders": 1000,
            "rate": 30.0,
            "malformed": 100,
            "worker_kills": 4,
            "relay_kills": 2,
            "rabbit_outage_s": 5.0,
            "postgres_outage_s": 5.0,
            "redis_outage_s": 8.0,
            "alarm_s": 35.0,
            "quiesce_timeout": 240.0,
            "timeout": 600.0,
            "payment_timeout_minutes": 1.5,
        }
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.alarms and self.payment_timeout_minutes > 0:
            # during the alarm no payment reaches the service (the shim answers 503, the bus blocks) and the
            # backlog drains after it: buyers who pay in time must still be in time
            self.payment_timeout_minutes += self.alarm_s / 60 + 0.5

    @property
    def alarms(self) -> bool:
        """Whether the run raises a resource alarm: only on a broker of its own, never on the shared node."""
        return self.topology == "cluster" or (self.private_rabbit and not self.real_restarts)

    @property
    def window(self) -> float:
        # a cluster's faults take minutes (a node boots in 10-30 s): the load goes on through all of them
        shortest = self.min_window if self.min_window is not None else 150.0 if self.topology == "cluster" else 20.0
        return max(shortest, self.orders / self.rate)
