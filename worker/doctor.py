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
from urllib.parse import urlsplit

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
    """What production mode refuses (:mod:`worker.production`), one finding each; and whether the
    service takes test money (``payments.mode: test``), said loudly."""
    from worker import production

    found = _test_money(settings)
    if settings.environment != "production":
        return [
            Finding(
                "environment",
                True,
                "development: production checks are off (development secrets and local payment fakes are accepted)",
                warning=True,
            ),
            *found,
        ]
    refused = production.problems(settings)
    if not refused:
        return [
            Finding(
                "production", True, "no development secret, provider URLs and certificate hosts are the providers'"
            ),
            *found,
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
    ] + found


def _test_money(settings: Settings) -> list[Finding]:
    from worker import production

    if settings.payments.mode != "test":
        return []
    which = production.takes_test_money(settings)
    return [
        Finding(
            "payments.mode",
            True,
            "TEST MONEY: payments.mode is test, so this service accepts the providers' test keys and "
            "sandboxes and takes NO REAL PAYMENT"
            + (f" ({'; '.join(which)})" if which else " (no test key or sandbox is configured now)"),
            "Unset payments.mode (ORDERS_PAYMENTS__MODE) or set it to live, with live keys, to take real money.",
            warning=True,
        )
    ]


def check_senders(settings: Settings) -> list[Finding]:
    """Who may send commands: the sender map (``senders``), or the open behaviour of development without one."""
    service = settings.rabbitmq.user
    if not settings.senders:
        if settings.environment == "development":
            return [
                Finding(
                    "senders",
                    True,
                    "no sender map: development is open, any broker user may send any command and claim admin "
                    "(today's local behaviour); production would accept commands from the service's own user "
                    f"({service}) only",
                    "Give each upstream service a broker user and map it (orders topology --users prints the map).",
                    warning=True,
                )
            ]
        return [
            Finding(
                "senders",
                True,
                f"no sender map: only the service's own broker user ({service}, the shim) may send commands; "
                "every other publisher's commands are refused as unauthorized",
                "Give each upstream service a broker user and map it (orders topology --users prints the map).",
                warning=True,
            )
        ]
    lines = []
    for user, grant in settings.senders.items():
        extra = (" as admin" if grant.admin else "") + (
            f" (providers: {', '.join(grant.providers)})" if grant.providers else ""
        )
        lines.append(f"{user}: {', '.join(grant.commands)}{extra}")
    return [Finding("senders", True, f"{service} (the service) may send everything; " + "; ".join(lines))]


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


#: the tables the service churns (schema/migrations/versions/0007_autovacuum_churned_tables.py tunes their autovacuum)
CHURNED_TABLES = ("outbox", "orders", "payments", "inbox", "order_history")
#: a table is far behind with more dead rows than this and than live ones
DEAD_ROWS_BEHIND = 10_000

_VACUUM_STATS = (
    "SELECT s.relname, s.n_live_tup, s.n_dead_tup,"
    " extract(epoch from now() - greatest(s.last_autovacuum, s.last_vacuum))::float8,"
    " EXISTS (SELECT FROM unnest(c.reloptions) o WHERE o LIKE 'autovacuum\\_enabled=%' AND NOT split_part(o, '=', 2)::bool)"
    " FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
    " WHERE s.schemaname = current_schema() AND s.relname = ANY(:tables) ORDER BY s.relname"
)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never vacuumed"
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"last vacuumed {seconds / size:.0f} {unit} ago"
    return f"last vacuumed {seconds:.0f} s ago"


def check_vacuum(settings: Settings) -> list[Finding]:
    """Whether autovacuum keeps the churned tables clean: on, not disabled per table, not far behind.

    Warnings only: the service runs, but dead rows make every read of those tables slower."""
    from sqlalchemy import text

    from worker import db

    engine = db.make_engine(settings.database, pool_size=1)
    try:
        with engine.connect() as conn:
            enabled = conn.execute(text("SHOW autovacuum")).scalar_one() == "on"
            stats = conn.execute(text(_VACUUM_STATS), {"tables": list(CHURNED_TABLES)}).all()
    except Exception:  # noqa: BLE001 - check_postgres already said why PostgreSQL cannot be read
        return []
    finally:
        engine.dispose()
    fix_on = (
        "Turn it on (autovacuum = on in postgresql.conf, then SELECT pg_reload_conf()); until then run "
        f"VACUUM (ANALYZE) {', '.join(CHURNED_TABLES)} from cron every few minutes."
    )
    found: list[Finding] = []
    if not enabled:
        found.append(
            Finding(
                "autovacuum",
                True,
                "autovacuum is off: dead rows of the outbox, orders, payments and inbox are never cleaned up, "
                "and every read of those tables slows down as they pile up",
                fix_on,
                warning=True,
            )
        )
    disabled = [name for name, _live, _dead, _ago_s, off in stats if off]
    if disabled:
        found.append(
            Finding(
                "autovacuum",
                True,
                f"autovacuum is disabled on {', '.join(disabled)} (autovacuum_enabled = false)",
                f"ALTER TABLE <table> RESET (autovacuum_enabled) for each of {', '.join(disabled)}.",
                warning=True,
            )
        )
    behind = [(name, live, dead, ago) for name, live, dead, ago, _off in stats if dead > max(DEAD_ROWS_BEHIND, live)]
    if behind:
        names = ", ".join(name for name, *_ in behind)
        found.append(
            Finding(
                "vacuum",
                True,
                "far behind: "
                + "; ".join(
                    f"{name}: {dead:,} dead rows, {live:,} live, {_ago(ago)}" for name, live, dead, ago in behind
                ),
                fix_on
                if not enabled
                else f"Run VACUUM (ANALYZE) {names} now, then look for what holds autovacuum back: a long open "
                "transaction (pg_stat_activity: 'idle in transaction', an old xact_start), a forgotten replication "
                "slot or prepared transaction (migration 0007 has it start at 1,000 dead outbox rows, 5,000 elsewhere).",
                warning=True,
            )
        )
    if not found:
        found.append(Finding("vacuum", True, f"autovacuum is on and keeps up with {', '.join(CHURNED_TABLES)}"))
    return found


def check_rabbitmq(settings: Settings) -> list[Finding]:
    from urllib.parse import urlsplit

    from worker.errors import BrokerError
    from worker.rabbit.topology import missing_topology

    url = settings.rabbitmq.url.get_secret_value()
    nodes = [urlsplit(node) for node in settings.rabbitmq.urls]
    where = ", ".join(f"{p.hostname}:{p.port or 5672}" for p in nodes) + f" vhost {nodes[0].path[1:] or '/'}"
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


# -- the payment settings (no provider is called) --------------------------------
#
# A configuration "looks like production" when a payment base URL points at a
# provider's live API host; then placeholder secrets and loopback entries in
# the PayPal certificate allow-list are errors rather than local-test comfort.

#: provider hosts that take real money
LIVE_HOSTS = {"api.stripe.com", "api-m.paypal.com", "api.paypal.com"}
#: substrings that mark a value nobody filled in
PLACEHOLDERS = ("fake", "change-me", "changeme", "placeholder", "example", "dummy", "xxx", "todo")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _placeholder(value: str) -> bool:
    lowered = value.strip().lower()
    return not lowered or any(p in lowered for p in PLACEHOLDERS)


def _url_problem(name: str, url: str) -> Finding | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Finding(name, False, f"{url!r} is not an http(s) URL", f"Set {name} to e.g. https://api.example.com.")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK:
        return Finding(
            name,
            False,
            f"{url} is plain http to a remote host",
            f"Use https for {name}; plain http is only for the local fakes.",
        )
    return None


def check_payments(settings: Settings) -> list[Finding]:
    stripe, paypal = settings.stripe, settings.paypal
    found: list[Finding] = []
    for name, url in (("stripe.api_base", stripe.api_base), ("paypal.base_url", paypal.base_url)):
        problem = _url_problem(name, url)
        if problem:
            found.append(problem)
    hosts = {urlsplit(stripe.api_base).hostname, urlsplit(paypal.base_url).hostname}
    live = bool(hosts & LIVE_HOSTS)
    secrets = {
        "stripe.api_key": stripe.api_key.get_secret_value(),
        "stripe.webhook_secret": stripe.webhook_secret.get_secret_value(),
        "paypal.client_id": paypal.client_id,
        "paypal.client_secret": paypal.client_secret.get_secret_value(),
        "paypal.webhook_id": paypal.webhook_id,
        "shim.jwt_secret": settings.shim.jwt_secret.get_secret_value(),
    }
    if live:
        for key, value in secrets.items():
            if _placeholder(value):
                env = "ORDERS_" + key.replace(".", "__").upper()
                found.append(
                    Finding(
                        key,
                        False,
                        "is a placeholder in a configuration that talks to a live provider",
                        f"Set the real value through {env} (from your secret store), not in the file.",
                    )
                )
        from handlers.payments.settings import cert_origins

        if LOOPBACK & {host for host, _port in cert_origins(paypal.cert_host_allowlist)}:
            found.append(
                Finding(
                    "paypal.cert_host_allowlist",
                    False,
                    "allows loopback hosts in production",
                    "Keep only PayPal's hosts (api.paypal.com, api-m.paypal.com) in the allow-list.",
                )
            )
    key = secrets["stripe.api_key"]
    if not key.startswith(("sk_", "rk_")):
        found.append(
            Finding(
                "stripe.api_key",
                False,
                "does not look like a Stripe secret key (sk_... or rk_...)",
                "Use the secret key from the Stripe dashboard, not the publishable pk_ key.",
            )
        )
    elif (
        live
        and settings.payments.mode != "test"
        and key.startswith(("sk_test_", "rk_test_"))
        and urlsplit(paypal.base_url).hostname in LIVE_HOSTS
    ):
        found.append(
            Finding(
                "stripe.api_key",
                True,
                "is a test-mode key while PayPal is live",
                "Use a live key (sk_live_...) if this is production.",
                warning=True,
            )
        )
    if not secrets["stripe.webhook_secret"].startswith("whsec_"):
        found.append(
            Finding(
                "stripe.webhook_secret",
                False,
                "does not look like a Stripe signing secret (whsec_...)",
                "Copy the endpoint's signing secret from the Stripe dashboard.",
            )
        )
    if not paypal.cert_host_allowlist:
        found.append(
            Finding(
                "paypal.cert_host_allowlist",
                False,
                "is empty: no PayPal webhook can be verified",
                "List PayPal's certificate hosts, e.g. [api.paypal.com, api-m.paypal.com].",
            )
        )
    if not [f for f in found if not f.ok or f.warning]:
        mode = "live providers" if live else "test/sandbox providers"
        found.append(Finding("payments", True, f"Stripe and PayPal settings look sane ({mode})"))
    return found


def run_all(config: Path | None) -> list[Finding]:
    """Every check, in dependency order; stops after a configuration that does not load."""
    settings, findings = check_configuration(config)
    if settings is None:
        return findings
    for check in (
        check_production,
        check_senders,
        check_postgres,
        check_vacuum,
        check_rabbitmq,
        check_redis,
        check_payments,
    ):
        findings += check(settings)
    return findings
