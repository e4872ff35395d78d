"""Helpers shared by the test modules (``from tests.support import ...``).

Test modules are imported by pytest's importlib mode, so they cannot import
``conftest``; the repository root is on ``sys.path`` (conftest puts it
there), which makes this module importable as ``tests.support``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def private_vhost(settings: Any, name: str) -> str:
    """A RabbitMQ vhost of this module's own (when rabbitmqctl is at hand), topology declared.

    Other test runs on this machine share the test vhost; a worker of theirs
    must never consume this module's commands.
    """
    from worker.rabbit.connection import BlockingBroker
    from worker.rabbit.topology import declare_topology

    url = settings.rabbitmq.url.get_secret_value()
    try:
        subprocess.run(["rabbitmqctl", "add_vhost", name], capture_output=True, timeout=60, check=False)
        done = subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 0:
            url = url[: url.rindex("/") + 1] + name
    except (OSError, subprocess.TimeoutExpired):
        pass
    broker = BlockingBroker(url).connect()
    declare_topology(broker.channel(), settings.worker.retry_delays_seconds)
    broker.close()
    return url
