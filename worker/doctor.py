"""``orders doctor``: is this deployment able to run, and if not, why and how to fix it.

Each check returns :class:`Finding` objects in plain words: what is wrong
and what to do.  Reachability is checked against the real servers with
short timeouts; the payment providers are *not* called (that costs money
and rate limit), only their configuration is checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker.settings import Settings, SettingsError, load_settings


@dataclass
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # worth knowing, but does not fail the doctor

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_configuration(path: Path | None) -> tuple[Settings | None, list[Finding]]:
    try:
        settings = load_settings(path)
    except SettingsError as exc:
        return None, [
            Finding(
                "configuration",
                False,
                str(exc),
                "Set the key named above in the configuration file or in the environment variable "
                "shown in brackets (ORDERS_<SECTION>__<KEY>); config/config.yaml lists every key.",
            )
        ]
    return settings, [Finding("configuration", True, "loaded and valid")]


def check_production(settings: Settings) -> list[Finding]:
    """What production mode refuses (:mod:`worker.production`), one finding each."""
    from worker import production

    if settings.environment != "production":
        return [
            Finding(
                "environment",
                True,
                "development: production checks are off (development secrets and local payment fakes are accepted)",
                warning=True,
            )
        ]
    refused = production.problems(settings)
    if not refused:
        return [
            Finding("production", True, "no development secret, provider URLs and certificate hosts are the providers'")
        ]
    return [
        Finding(
            "production",
            False,
            p.line(),
            f"Set {p.variable} (or {p.key} in the configuration file); the worker, relay and shim refuse "
            "to start until it is fixed.",
        )
        for p in refused
    ]


def check_postgres(settings: Settings) -> list[Finding]:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from worker import db

    where = f"{settings.database.host}:{settings.database.port}/{settings.database.dbname}"
    engine = db.make_engine(settings.database, pool_size=1)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except Exception as exc:  # noqa: BLE001 - diagnosed below
        message = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__
        if "does not exist" in message and "database" in message:
            fix = "Create it and its tables with `orders migrate`."
        elif "authentication" in message or "password" in message:
            fix = "Check database.user and database.password (ORDERS_DATABASE__USER / __PASSWORD)."
        else:
            fix = "Start PostgreSQL, or point database.host/port (ORDERS_DATABASE__HOST / __PORT) at it."
        return [Finding("postgresql", False, f"cannot connect to {where}: {message}", fix)]
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(db.alembic_config(engine)).get_current_head()
    found = [Finding("postgresql", True, f"reachable at {where}")]
    if current != head:
        found.append(
            Finding(
                "migrations",
                False,
                f"database is at revision {current or 'none'}, the code expects {head}",
                "Run `orders migrate` (the Procfile's release step does it on deploy).",
            )
        )
    else:
        found.append(Finding("migrations", True, f"at head ({head})"))
    return found


def check_rabbitmq(settings: Settings) -> list[Finding]:
    from urllib.parse import urlsplit

    from worker.errors import BrokerError
    from worker.rabbit.topology import missing_topology

    url = settings.rabbitmq.url.get_secret_value()
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 5672} vhost {parts.path[1:] or '/'}"
    try:
        missing = missing_topology(url, settings.worker.retry_delays_seconds)
    except BrokerError as exc:
        text = str(exc)
        if "Authentication" in text or "ACCESS_REFUSED" in text:
            fix = "Check the user and password in rabbitmq.url (ORDERS_RABBITMQ__URL)."
        elif "vhost" in text.lower() or "NOT_ALLOWED" in text:
            fix = "Create the vhost (rabbitmqctl add_vhost) and grant the user permissions on it, or fix rabbitmq.url."
        else:
            fix = "Start RabbitMQ, or point rabbitmq.url (ORDERS_RABBITMQ__URL) at it."
        return [Finding("rabbitmq", False, f"cannot connect to {where}: {text}", fix)]
    found = [Finding("rabbitmq", True, f"reachable at {where}")]
    if missing:
        found.append(
            Finding(
                "topology",
                False,
                "missing: " + ", ".join(missing),
                "Run `orders topology` (safe to repeat; the Procfile's release step runs it).",
            )
        )
    else:
        found.append(Finding("topology", True, "every exchange and queue is declared"))
    return found


def check_redis(settings: Settings) -> list[Finding]:
    from worker.read_model import make_redis

    where = f"{settings.redis.host}:{settings.redis.port}/{settings.redis.db}"
    try:
        make_redis(settings.redis).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        return [
            Finding(
                "redis",
                False,
                f"cannot reach {where}: {type(exc).__name__}: {exc}",
                "Start Redis, or point redis.host/port (ORDERS_REDIS__HOST / __PORT) at it. Workers still "
                "run without it (reads fall back to PostgreSQL), but the shim's rate limits need it.",
            )
        ]
    return [Finding("redis", True, f"reachable at {where}")]


def run_all(config: Path | None) -> list[Finding]:
    """Every check, in dependency order; stops after a configuration that does not load."""
    from worker.payment_config import check_payments

    settings, findings = check_configuration(config)
    if settings is None:
        return findings
    for check in (check_production, check_postgres, check_rabbitmq, check_redis, check_payments):
        findings += check(settings)
    return findings
