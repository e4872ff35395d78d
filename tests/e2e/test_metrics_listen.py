"""Where the worker pool's and the relay's metrics listen: ``metrics.host`` (127.0.0.1
unless configured), never every interface.  Both loopback addresses below belong to
this machine, so a server bound to all interfaces would answer on both."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from scripts.tcp_proxy import free_port


def _two_free_ports() -> int:
    """A port whose successor is free too (the pool serves on it, the relay on the next)."""
    while True:
        port = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def _answers(host: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/metrics", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(
    ("configured", "listening", "other"),
    [
        (None, "127.0.0.1", "127.0.0.2"),  # the default
        ("127.0.0.2", "127.0.0.2", "127.0.0.1"),
    ],
)
def test_pool_and_relay_metrics_listen_only_on_the_configured_host(
    service, commands_only, wait, configured, listening, other
):
    port = _two_free_ports()
    env: dict[str, Any] = {"ORDERS_METRICS__PORT": str(port)}
    if configured:
        env["ORDERS_METRICS__HOST"] = configured
    service("worker", "--processes", "1", *commands_only, **env)
    service("relay", **env)
    for p in (port, port + 1):
        wait(lambda p=p: _answers(listening, p), timeout=60, what=f"metrics on {listening}:{p}")
        assert not _answers(other, p)
