"""Fixtures every layer may use (no server behind any of them), and the layers themselves.

The tests are in three layers (docs/testing.md):

* ``tests/unit``: no server at all, no service process;
* ``tests/integration``: real PostgreSQL, RabbitMQ and Redis used in-process, and the HTTP fakes;
* ``tests/e2e``: the service's processes started through the real CLI, killed, cut off.

The server fixtures live in the plugin ``tests/servers.py``; a unit test that
asks for one of them fails at once, so ``pytest tests/unit`` never needs a
server.  Each test is marked with its layer (``-m "not e2e"`` and so on).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the fakes, the harness and the TCP proxy live in scripts/, outside the packages
    sys.path.insert(0, str(ROOT))

from tests.support import place_body, wait_until  # noqa: E402

pytest_plugins = ["tests.servers"]

TESTS = Path(__file__).resolve().parent
LAYERS = {
    "unit": "no server and no service process",
    "integration": "real PostgreSQL, RabbitMQ and Redis in-process, and the HTTP fakes",
    "e2e": "the service's processes as subprocesses: kills, outages, chaos",
}
#: the plugin whose fixtures need servers
SERVER_PLUGIN = "tests.servers"


def pytest_configure(config: pytest.Config) -> None:
    for name, what in LAYERS.items():
        config.addinivalue_line("markers", f"{name}: {what} (tests/{name})")


def layer_of(path: Path) -> str | None:
    try:
        top = Path(path).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return top if top in LAYERS else None


def server_fixtures_of(item: pytest.Item) -> list[str]:
    """The fixtures of the server plugin that ``item`` uses, directly or through other fixtures."""
    info = getattr(item, "_fixtureinfo", None)
    used = []
    for name, defs in (getattr(info, "name2fixturedefs", None) or {}).items():
        if any(getattr(d.func, "__module__", "") == SERVER_PLUGIN for d in defs):
            used.append(name)
    return sorted(used)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        layer = layer_of(item.path)
        if layer is not None:
            item.add_marker(getattr(pytest.mark, layer))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if layer_of(item.path) == "unit" and (used := server_fixtures_of(item)):
        pytest.fail(
            f"a unit test uses server fixtures ({', '.join(used)}): move it to tests/integration or tests/e2e",
            pytrace=False,
        )


@pytest.fixture
def commands_only() -> list[str]:
    """``orders worker`` flags for a pool without the payment step."""
    return [
        "--queue",
        "orders.place",
        "--queue",
        "orders.cancel",
        "--queue",
        "orders.payment-confirmed",
        "--queue",
        "orders.ship",
    ]


@pytest.fixture
def make_place() -> Callable[..., dict[str, Any]]:
    return place_body


@pytest.fixture
def wait() -> Callable[..., Any]:
    return wait_until


@pytest.fixture
def spans() -> Iterator[Any]:
    """Tracing on in this process (worker/tracing.py), into the SDK's in-memory exporter, with the
    service's sampler; off again afterwards.  Ask for it before anything that must be made traced."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    from worker import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=tracing.no_orphan_clients(ParentBased(ALWAYS_ON)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()
