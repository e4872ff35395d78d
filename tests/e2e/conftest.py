"""End-to-end tests that start servers of their own (``-m "not slow"`` leaves them out)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts servers of its own (a RabbitMQ cluster, PostgreSQL clusters)")
