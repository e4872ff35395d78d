"""The RabbitMQ users of the service, with least privilege (``orders topology --users``).

docs/contract.md and docs/security.md: each publisher has a broker user of its own, the broker checks a
command's ``user_id`` property against it, and the service maps users to
what they may send (the ``senders`` setting, :mod:`handlers.senders`).  So,
in the service's vhost:

- one *sender* user per entry of the sender map (a shop, a fulfilment
  service, an internal payment service, a back office): it may publish to
  ``orders.commands`` and do nothing else: no declaring, no consuming, no
  publishing to ``orders.internal`` (where a forged ``RefundPayment`` would
  give money back) or to any other exchange;
- the *service* user (workers, relay, shim, CLI) may touch exactly the
  exchanges and queues of :mod:`schema.topology`, and no other.

What a sender may *send* on ``orders.commands`` is the sender map's business,
not the broker's: the broker only vouches for who sent it.  With no map
configured, ``--users`` makes the :data:`DEFAULT_SENDERS` and prints the map
to paste into the settings.

RabbitMQ checks three regular expressions per user and vhost, over the names
of exchanges and queues: *configure* (declare, delete), *write* (publish to an
exchange; bind a queue), *read* (consume or get from a queue; bind from an
exchange).  A queue declared with a dead-letter exchange also needs *write* on
that exchange and *read* on the queue.  The default exchange is named
``amq.default`` in these checks.

Passwords come from the environment (:func:`password_env`), never from the
command line, and reach ``rabbitmqctl`` on its standard input, so they never
show in a process list either.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from schema.topology import (
    COMMAND_QUEUES,
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELAY_EXCHANGE,
    EXCHANGES,
    INTERNAL_EXCHANGE,
    PAYMENTS_QUEUE,
)
from worker.errors import BrokerError
from worker.rabbit.connection import REPLY_TO
from worker.rabbit.dead_letters import DLQ_LOCK_QUEUE

#: environment variable holding the service user's password
SERVICE_PASSWORD_ENV = "ORDERS_SERVICE_PASSWORD"
#: the senders ``--users`` makes when the settings have no sender map: name -> (commands, admin, providers)
DEFAULT_SENDERS: dict[str, tuple[tuple[str, ...], bool, tuple[str, ...]]] = {
    "shop": (("PlaceOrder", "CancelOrder"), False, ()),
    "fulfilment": (("ShipOrder",), False, ()),
    "payments": (("PaymentConfirmed",), False, ("internal",)),
    "backoffice": (("CancelOrder",), True, ()),
}


def password_env(user: str) -> str:
    """The environment variable holding a sender user's password: ``ORDERS_PASSWORD_<USER>``
    (upper case, every character other than a letter or digit as ``_``)."""
    return "ORDERS_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", user.upper())


#: the delay tiers (``orders.delay.<N>s``, see :func:`schema.topology.delay_queue`): every N, so that
#: changing ``worker.retry_delays_seconds`` needs no new grant
DELAY_QUEUES = r"orders\.delay\.[0-9]+s"
#: what RabbitMQ calls the default exchange in permission checks
DEFAULT_EXCHANGE = "amq.default"
#: seconds one rabbitmqctl call may take
RABBITMQCTL_TIMEOUT = 60


class UserSetupError(BrokerError):
    """A user could not be created or granted its permissions."""


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str


def _only(names: Iterable[str], patterns: Iterable[str] = ()) -> str:
    """A regex that matches exactly these names (and these patterns), nothing else."""
    alternatives = [re.escape(n).replace(r"\-", "-") for n in names] + list(patterns)
    if len(alternatives) == 1:
        return f"^{alternatives[0]}$"
    return "^(" + "|".join(alternatives) + ")$" if alternatives else "^$"


def sender_permissions() -> Permissions:
    """Publish commands to ``orders.commands``; nothing else."""
    return Permissions(configure="^$", write=_only([COMMANDS_EXCHANGE]), read="^$")


def service_permissions() -> Permissions:
    """Everything :func:`worker.rabbit.topology.declare_topology` and the processes need, nothing more."""
    exchanges = EXCHANGES
    work = [*COMMAND_QUEUES, PAYMENTS_QUEUE, DEAD_LETTER_QUEUE]
    return Permissions(
        # declare every exchange and queue, and the `orders dlq` session lock (an exclusive queue)
        configure=_only([*exchanges, *work, DLQ_LOCK_QUEUE], [DELAY_QUEUES]),
        # publish: events and internal commands (relay), commands (shim), retries and dead letters (workers),
        # replies and `dlq replay --to` (default exchange); bind: the queues; declare with a dead-letter
        # exchange: orders.dlx (work queues) and the default exchange (delay queues)
        write=_only([*exchanges, DEFAULT_EXCHANGE, *work], [DELAY_QUEUES]),
        # consume the work queues and the dead-letter queue, and the shim's direct reply-to (a pseudo-queue
        # RabbitMQ 3.x does not check; granted for a broker that does); bind from the exchanges the queues
        # hang off; declare a queue with a dead-letter exchange: that queue
        read=_only(
            [*work, REPLY_TO, COMMANDS_EXCHANGE, INTERNAL_EXCHANGE, DEAD_LETTER_EXCHANGE, DELAY_EXCHANGE],
            [DELAY_QUEUES],
        ),
    )


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names ("/" when it names none); of the first node when it names several."""
    path = urlsplit(url.split(",")[0].strip()).path
    return unquote(path[1:]) if len(path) > 1 else "/"


@dataclass(frozen=True)
class Step:
    """One rabbitmqctl call, or (``password_env`` set) the user's password: ``add_user`` for a new user,
    ``change_password`` for an existing one, the value of ``password_env`` going to its stdin."""

    args: tuple[str, ...]
    password_env: str | None = None


def recipe(vhost: str, service: str, senders: Sequence[str]) -> list[Step]:
    """The rabbitmqctl calls that create or update the service user and every sender user, and set their
    permissions in ``vhost``."""
    if service in senders:
        raise UserSetupError(f"{service!r} cannot be both the service user and a sender (that is the boundary)")
    steps: list[Step] = []
    users = [(service, SERVICE_PASSWORD_ENV, service_permissions())]
    users += [(user, password_env(user), sender_permissions()) for user in senders]
    for user, env, perms in users:
        steps += [
            Step(("user", user), env),
            Step(("set_user_tags", user)),  # no tags: no management UI or HTTP API
            Step(("set_permissions", "-p", vhost, user, perms.configure, perms.write, perms.read)),
        ]
    return steps


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def render(steps: list[Step]) -> str:
    """The recipe as a POSIX shell script (``--print``), reading the passwords from the environment."""
    envs = sorted({s.password_env for s in steps if s.password_env})
    lines = [
        "#!/bin/sh",
        "# orders topology --users: run where rabbitmqctl reaches the cluster, with",
        f"# {', '.join(envs)} set in the environment.",
        "set -eu",
    ]
    lines += [f': "${{{env}:?set {env}}}"' for env in envs]
    for step in steps:
        if step.password_env is None:
            lines.append("rabbitmqctl " + " ".join(_quote(a) for a in step.args))
            continue
        user, password = _quote(step.args[-1]), f"printf '%s\\n' \"${step.password_env}\""
        lines += [
            f"if rabbitmqctl -q list_users | cut -f1 | grep -qxF {user}; then",
            f"  {password} | rabbitmqctl change_password {user}",
            f"else {password} | rabbitmqctl add_user {user}; fi",
        ]
    return "\n".join(lines) + "\n"


def _ctl(rabbitmqctl: str, args: tuple[str, ...], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            [rabbitmqctl, *args], input=stdin, capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserSetupError(f"rabbitmqctl {args[0]}: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise UserSetupError(f"rabbitmqctl {args[0]} failed ({done.returncode}): {said[-1] if said else ''}")
    return done.stdout


def existing_users(rabbitmqctl: str = "rabbitmqctl") -> set[str]:
    out = _ctl(rabbitmqctl, ("list_users", "-q", "--formatter", "json"))
    return {u["user"] for u in json.loads(out or "[]")}


def apply(steps: list[Step], environ: Mapping[str, str], rabbitmqctl: str = "rabbitmqctl") -> list[str]:
    """Run the recipe; returns what was done, one line per call (never a password)."""
    missing = sorted({s.password_env for s in steps if s.password_env and not environ.get(s.password_env)})
    if missing:
        raise UserSetupError(f"set {' and '.join(missing)} (a password is never taken from the command line)")
    users = existing_users(rabbitmqctl)
    done = []
    for step in steps:
        args, stdin = step.args, None
        if step.password_env is not None:
            args = ("change_password" if step.args[-1] in users else "add_user", step.args[-1])
            stdin = environ[step.password_env] + "\n"
        _ctl(rabbitmqctl, args, stdin)
        done.append(" ".join(args))
    return done


def sender_map_yaml(senders: Mapping[str, tuple[Iterable[str], bool, Iterable[str]]]) -> str:
    """The ``senders`` setting for these users, as YAML to paste into the configuration."""
    lines = ["senders:"]
    for user, (commands, admin, providers) in senders.items():
        parts = [f"commands: [{', '.join(commands)}]"]
        if admin:
            parts.append("admin: true")
        providers = list(providers)
        if providers:
            parts.append(f"providers: [{', '.join(providers)}]")
        lines.append(f"  {json.dumps(user)}: {{{', '.join(parts)}}}")
    return "\n".join(lines) + "\n"
