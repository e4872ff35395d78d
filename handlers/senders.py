"""Who sent a command, and what that sender may make it do.

A command's effects depend on who sent it, never on what its body claims
about the sender.  RabbitMQ vouches for the sender: it refuses a publish
whose ``user_id`` property is not the publishing connection's user.  The
service maps broker users to what they may send (the ``senders`` setting):

- ``commands``: the command types the user may send at all;
- ``admin``: whether a CancelOrder's ``requested_by.roles: ["admin"]`` is
  honoured (the back office; the shim, for the admins it authenticated by
  JWT); from anyone else a cancel is judged as the named user's;
- ``providers``: which ``provider`` a PaymentConfirmed from it may name.
  Only the service's own user (the shim's webhook endpoint, which checked
  the provider's signature) may name ``stripe`` or ``paypal``.

The service's own broker user may send everything.  With an empty map in
development every sender may (the open behaviour of a local set-up); in
production a command without ``user_id``, or from a user the map does not
allow, is refused as :class:`handlers.errors.Unauthorized`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from handlers.errors import Unauthorized
from schema.messages import Command, PaymentConfirmed
from schema.topology import COMMAND_TYPES

#: every provider a PaymentConfirmed may name
PROVIDERS = frozenset({"stripe", "paypal", "internal"})
#: the providers only the service's own webhook endpoint may vouch for
WEBHOOK_PROVIDERS = frozenset({"stripe", "paypal"})


@dataclass(frozen=True)
class Sender:
    """A sender as the broker identified it, with what it may send."""

    #: the broker user (the ``user_id`` RabbitMQ checked); None when the message named none
    user: str | None
    commands: frozenset[str]
    admin: bool = False
    providers: frozenset[str] = frozenset()

    def check(self, command: Command) -> None:
        """Raise :class:`Unauthorized` when this sender may not send ``command``."""
        kind = type(command).__name__
        who = f"broker user {self.user!r}" if self.user else "a sender with no user_id"
        if kind not in self.commands:
            raise Unauthorized(f"{who} may not send {kind}")
        if isinstance(command, PaymentConfirmed) and command.provider not in self.providers:
            raise Unauthorized(f"{who} may not confirm payments for provider {command.provider!r}")


#: may send everything, act as admin and vouch for webhooks: the service's own user, and every
#: sender of a development set-up without a sender map
TRUSTED = Sender(None, frozenset(COMMAND_TYPES), admin=True, providers=PROVIDERS)


@dataclass(frozen=True)
class Grant:
    """One entry of the sender map: what a broker user may send."""

    commands: frozenset[str]
    admin: bool = False
    providers: frozenset[str] = frozenset()


class SenderMap:
    """Broker user → :class:`Sender`; built once from the settings (``worker.bootstrap``)."""

    def __init__(self, grants: Mapping[str, Grant], service_user: str | None, open_: bool = False) -> None:
        self.grants = dict(grants)
        self.service_user = service_user
        #: development without a map: every sender is trusted, as before senders had identities
        self.open = open_

    def sender(self, user: str | None) -> Sender:
        """What ``user`` may send (nothing when the map does not name it)."""
        if self.open or (user is not None and user == self.service_user):
            return Sender(user, TRUSTED.commands, TRUSTED.admin, TRUSTED.providers)
        grant = self.grants.get(user) if user is not None else None
        if grant is None:
            return Sender(user, frozenset())
        return Sender(user, grant.commands, grant.admin, grant.providers)

    @classmethod
    def of(
        cls, entries: Mapping[str, tuple[Iterable[str], bool, Iterable[str]]], service_user: str | None, open_: bool
    ) -> SenderMap:
        """A map from ``{user: (commands, admin, providers)}``."""
        grants = {
            user: Grant(frozenset(commands), admin, frozenset(providers))
            for user, (commands, admin, providers) in entries.items()
        }
        return cls(grants, service_user, open_)


#: the map of tests and in-process callers that pass none: everyone is trusted
OPEN = SenderMap({}, None, open_=True)
