"""Who sent a delivery, as the broker vouched for it, kept across retries, dead letters and replays.

RabbitMQ refuses a publish whose ``user_id`` property is not the
connection's own user, so a delivery's ``user_id`` is its sender's broker
user.  When the service republishes a command (a retry through the delay
tiers, a dead letter, an operator's replay) it publishes as its own user,
so it cannot keep the sender's ``user_id``: it sets ``user_id`` to its own
user and names the first sender in the header :data:`SENDER_HEADER`.  That
header is believed only on a message whose ``user_id`` is the service's own
user; anyone else who sets it is judged by their own ``user_id``.

A command that names no sender (no ``user_id``) keeps that: the header is
then empty, and a replay of such a dead letter is refused again in
production instead of running with the service's rights.
"""

from __future__ import annotations

from typing import Any

from handlers.senders import Sender, SenderMap
from schema.topology import SENDER_HEADER
from worker.rabbit.connection import Delivery
from worker.settings import Settings

__all__ = ["SENDER_HEADER", "Identities", "sender_map"]


def sender_map(settings: Settings) -> SenderMap:
    """The ``senders`` setting as a :class:`handlers.senders.SenderMap`: open only in development without one."""
    grants = {user: (g.commands, g.admin, g.providers) for user, g in settings.senders.items()}
    return SenderMap.of(grants, settings.rabbitmq.user, settings.environment == "development" and not grants)


class Identities:
    """Senders of deliveries, by the sender map, and the properties that carry them on."""

    def __init__(self, senders: SenderMap) -> None:
        self.senders = senders
        self.service_user = senders.service_user

    @classmethod
    def of(cls, settings: Settings) -> Identities:
        return cls(sender_map(settings))

    def user_of(self, d: Delivery) -> str | None:
        """The broker user that sent ``d`` first (None: it named none)."""
        if d.user_id is not None and d.user_id == self.service_user and SENDER_HEADER in d.headers:
            first = d.headers[SENDER_HEADER]
            if isinstance(first, bytes):
                first = first.decode("utf-8", "replace")
            return str(first) or None
        return d.user_id

    def sender(self, d: Delivery) -> Sender:
        return self.senders.sender(self.user_of(d))

    def carry(self, d: Delivery, properties: dict[str, Any]) -> dict[str, Any]:
        """``properties`` (with their ``headers``) to republish ``d`` with as the service's own user."""
        headers = dict(properties.get("headers") or {})
        headers[SENDER_HEADER] = self.user_of(d) or ""
        carried = {**properties, "headers": headers}
        if self.service_user is not None:
            carried["user_id"] = self.service_user
        return carried
