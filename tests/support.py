"""Helpers shared by the test modules (``from tests.support import ...``).

Test modules are imported by pytest's importlib mode, so they cannot import
``conftest``; the repository root is on ``sys.path`` (conftest puts it
there), which makes this module importable as ``tests.support``.
"""

from __future__ import annotations

from typing import Any

from scripts import harness
from scripts.harness import wait_until

__all__ = ["place_body", "private_vhost", "wait_until"]


def place_body(
    user: str = "user-1", items: list[tuple[str, int]] | None = None, order_id: str | None = None
) -> dict[str, Any]:
    """A PlaceOrder body (a Stripe card payment)."""
    body: dict[str, Any] = {
        "user_id": user,
        "items": [{"product_id": p, "quantity": q} for p, q in (items or [("sku-apple", 2)])],
        "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
    }
    if order_id:
        body["order_id"] = order_id
    return body


def private_vhost(settings: Any, name: str) -> str:
    """A RabbitMQ vhost of this module's own (when rabbitmqctl is at hand), topology declared.

    Other test runs on this machine share the test vhost; a worker of theirs
    must never consume this module's commands.
    """
    from worker.rabbit.connection import BlockingBroker
    from worker.rabbit.topology import declare_topology

    url = settings.rabbitmq.url.get_secret_value()
    if harness.private_vhost_or_default(name):
        url = harness.vhost_url(url, name)
    broker = BlockingBroker(url).connect()
    declare_topology(broker.channel(), settings.worker.retry_delays_seconds)
    broker.close()
    return url
