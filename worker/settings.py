"""Settings: one frozen object, read once at start-up.

The file (``config/config.yaml``, or the path in ``ORDERS_CONFIG``) is read
first; environment variables ``ORDERS_<SECTION>__<KEY>`` override single
keys.  A missing or malformed key stops start-up with a
:class:`SettingsError` that names the key, never with a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin
from urllib.parse import quote, unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    model_validator,
)

from handlers.orders import Rules
from handlers.payments.settings import PayPalSettings, StripeSettings
from schema.topology import COMMAND_TYPES

#: Prefix of the environment variables that override the file.
ENV_PREFIX = "ORDERS_"
#: Default file, relative to the project root.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"


class SettingsError(Exception):
    """The configuration is missing a key or has a malformed one."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _comma_list(value: Any) -> Any:
    """``"a,b"`` (as the environment gives it) → ``("a", "b")``; a YAML list → a tuple; anything else as is."""
    if isinstance(value, str) and "," in value:
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(value)
    return value


Port = Annotated[int, Field(gt=0, lt=65536)]


def _ports(value: Any) -> Any:
    """A port, or several ("5442,5443" or a YAML list), each a number; anything else named plainly."""
    value = _comma_list(value)
    parts = value if isinstance(value, tuple) else (value,)
    for part in parts:
        if isinstance(part, bool) or not (isinstance(part, int) or (isinstance(part, str) and part.isdigit())):
            raise ValueError(f"{part!r} is not a port number (one, or several separated by commas)")
    return tuple(int(p) for p in parts) if isinstance(value, tuple) else int(value)


class DatabaseSettings(_Section):
    """One PostgreSQL server, or a primary and its standbys.

    With several hosts (``host: "a,b"`` and ``port: "5432,5433"``, or one port
    for all), libpq tries them in order and, with ``target_session_attrs``
    ``read-write`` (the default then), keeps only the one that takes writes:
    after a failover every new connection finds the promoted standby.
    """

    host: Annotated[str | tuple[str, ...], BeforeValidator(_comma_list)]
    port: Annotated[Port | tuple[Port, ...], BeforeValidator(_ports)]
    user: str
    password: SecretStr
    dbname: str
    pool_size: int = Field(default=5, ge=1)
    #: libpq's target_session_attrs; "" = ``read-write`` with several hosts, libpq's default with one
    target_session_attrs: Literal["", "any", "read-write", "read-only", "primary", "standby", "prefer-standby"] = ""

    @model_validator(mode="after")
    def _ports_match_hosts(self) -> DatabaseSettings:
        if isinstance(self.port, tuple) and len(self.port) != len(self.hosts):
            raise ValueError(f"database.port names {len(self.port)} ports for {len(self.hosts)} hosts")
        return self

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.host if isinstance(self.host, tuple) else (self.host,)

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every server, in the order libpq tries them."""
        ports = self.port if isinstance(self.port, tuple) else (self.port,) * len(self.hosts)
        return list(zip(self.hosts, ports))

    @property
    def session_attrs(self) -> str:
        return self.target_session_attrs or ("read-write" if len(self.hosts) > 1 else "")

    @property
    def url(self) -> str:
        password = self.password.get_secret_value()
        auth = quote(self.user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        nodes = self.nodes
        if len(nodes) == 1 and not self.session_attrs:
            host, port = nodes[0]
            return f"postgresql+psycopg2://{auth}@{host}:{port}/{self.dbname}"
        # SQLAlchemy's form for several hosts: libpq gets them all and picks
        query = "&".join(f"host={quote(h, safe='')}:{p}" for h, p in nodes)
        if self.session_attrs:
            query += f"&target_session_attrs={self.session_attrs}"
        return f"postgresql+psycopg2://{auth}@/{self.dbname}?{query}"

    @property
    def dsn(self) -> str:
        """libpq connection string (for psycopg2 and pgbench)."""
        nodes = self.nodes
        hosts = ",".join(h for h, _ in nodes)
        ports = ",".join(str(p) for _, p in nodes)
        parts = f"host={hosts} port={ports} user={self.user} dbname={self.dbname}"
        if self.session_attrs:
            parts += f" target_session_attrs={self.session_attrs}"
        password = self.password.get_secret_value()
        return parts + (f" password={password}" if password else "")


class RedisSettings(_Section):
    host: str
    port: int = Field(gt=0, lt=65536)
    db: int = Field(default=0, ge=0)
    cache_ttl_seconds: int = Field(default=300, gt=0)


def _join_urls(value: Any) -> Any:
    """A YAML list of node URLs → one comma-separated secret (the form the environment gives)."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return value


class RabbitSettings(_Section):
    """One RabbitMQ node or a cluster: ``url`` is one AMQP URL, or several (a YAML list, or comma-separated)."""

    url: Annotated[SecretStr, BeforeValidator(_join_urls)]
    heartbeat_seconds: int = Field(default=30, gt=0)
    #: replicas of each quorum queue (``x-quorum-initial-group-size``); RabbitMQ uses every node when it has fewer
    quorum_group_size: int = Field(default=3, ge=1)

    @property
    def urls(self) -> list[str]:
        """Every node's URL, in the configured order."""
        return [u.strip() for u in self.url.get_secret_value().split(",") if u.strip()]

    @property
    def user(self) -> str:
        """The service's own broker user (percent-decoded, as RabbitMQ sees it; pika's ``guest`` when unnamed)."""
        urls = self.urls
        name = urlsplit(urls[0]).username if urls else None
        return unquote(name) if name else "guest"


class SenderGrant(_Section):
    """What one broker user may send (an entry of ``senders``; see :mod:`handlers.senders`)."""

    #: the commands it may send: PlaceOrder, CancelOrder, PaymentConfirmed, ShipOrder
    commands: tuple[str, ...] = Field(min_length=1)
    #: CancelOrder: its ``requested_by.roles: ["admin"]`` is honoured (a back office)
    admin: bool = False
    #: PaymentConfirmed: the providers it may name; only ``internal`` (a confirmation naming Stripe or
    #: PayPal comes only from the service's own webhook endpoint, which checked the provider's signature)
    providers: tuple[Literal["internal"], ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> SenderGrant:
        unknown = sorted(set(self.commands) - COMMAND_TYPES)
        if unknown:
            raise ValueError(f"unknown command(s) {', '.join(unknown)} (known: {', '.join(sorted(COMMAND_TYPES))})")
        if self.admin and "CancelOrder" not in self.commands:
            raise ValueError("admin: true means its CancelOrder may act as admin; list CancelOrder in commands")
        if ("PaymentConfirmed" in self.commands) != bool(self.providers):
            raise ValueError("PaymentConfirmed and providers go together (providers: [internal])")
        return self


def _sender_name(name: str) -> str:
    if not name or len(name) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{name!r} is not a broker user name")
    return name


class WorkerSettings(_Section):
    processes: int = Field(default=2, ge=1)
    prefetch: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=250, ge=1)
    batch_wait_ms: int = Field(default=20, ge=0)
    #: provider calls in flight per worker process (the payment steps of every batch call at once)
    payment_concurrency: int = Field(default=64, ge=1)
    #: payment steps applied together: two transactions a batch, its provider calls at the same time
    payment_batch_size: int = Field(default=50, ge=1)
    #: a PayPal capture marked as sent but not seen at PayPal this long after counts as never sent
    capture_settle_seconds: float = Field(default=60, gt=0)
    inplace_retries: int = Field(default=3, ge=1)
    retry_delays_seconds: tuple[int, ...] = (1, 5, 30, 120)
    inbox_retention_days: float = Field(default=7, gt=0)
    outbox_retention_hours: float = Field(default=0, ge=0)
    shutdown_timeout_seconds: float = Field(default=30, gt=0)
    liveness_file: str = "/tmp/orders-worker.alive"


class OrdersSettings(_Section):
    """The shop's choices in an order's life (:class:`handlers.orders.Rules`)."""

    #: minutes an order may wait ``awaiting_payment`` before it expires (fractions allowed); 0: never
    payment_timeout_minutes: float = Field(default=60, ge=0)
    #: minutes after payment during which the owner may still cancel a paid order (refunded); 0: only an admin
    customer_cancel_minutes: float = Field(default=0, ge=0)
    #: seconds between two expiry sweeps: an order expires at most this long after its deadline
    expiry_sweep_seconds: float = Field(default=10, gt=0, le=60)

    def rules(self) -> Rules:
        return Rules(self.payment_timeout_minutes, self.customer_cancel_minutes)


class RelaySettings(_Section):
    batch_size: int = Field(default=1000, ge=1)
    poll_interval_seconds: float = Field(default=1.0, gt=0)


class ShimSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    #: HS256 key of the bearer tokens ("" accepts no HS256 token: set jwt_public_key instead)
    jwt_secret: SecretStr
    jwt_public_key: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    place_rate_per_minute: int = Field(default=60, gt=0)
    read_rate_per_minute: int = Field(default=600, gt=0)
    #: per client address (many users may share one behind a NAT, hence larger)
    place_rate_per_minute_per_address: int = Field(default=600, gt=0)
    read_rate_per_minute_per_address: int = Field(default=6000, gt=0)
    #: payment webhooks (``POST /orders/payment-confirmation``) per client address: they come unauthenticated,
    #: and each may make the shim verify a signature or fetch a certificate.  Stripe and PayPal deliver from a
    #: few addresses each: keep it above the busiest minute of webhooks one of them sends
    webhook_rate_per_minute_per_address: int = Field(default=1200, gt=0)
    #: HMAC-SHA256 secret of the internal payment service's webhooks ("" disables them)
    webhook_hmac_secret: SecretStr = SecretStr("")
    webhook_tolerance_seconds: int = Field(default=300, gt=0)
    #: longest ``Prefer: wait=N`` honoured
    max_wait_seconds: int = Field(default=30, ge=0, le=30)
    #: how long a request waits for the broker (connecting, then the publish's confirm) before answering 503
    publish_timeout_seconds: float = Field(default=5.0, gt=0)
    #: how long an Idempotency-Key is remembered
    idempotency_ttl_seconds: int = Field(default=86400, gt=0)
    #: largest request body accepted (bytes); larger answers 413
    max_body_bytes: int = Field(default=65536, gt=0)
    #: HMAC-SHA256 key from which order ids of an Idempotency-Key are derived (nobody else can compute them)
    id_secret: SecretStr = SecretStr("")
    #: uvicorn worker processes (``orders shim --workers`` overrides it and tells its workers)
    workers: int = Field(default=1, ge=1)
    #: requests one shim process works on at once; beyond it a request is shed (503, Retry-After)
    max_concurrent_requests: int = Field(default=256, ge=1)
    #: Redis connections of one shim process.  A request holds one only while it waits on Redis,
    #: so a quarter of max_concurrent_requests serves a healthy process; equal to it, the pool can
    #: never run dry, but a burst then opens that many connections at once (connects that time
    #: out on a saturated event loop look like an outage)
    redis_pool_size: int = Field(default=64, ge=1)
    #: how long a request waits for a free Redis connection before it is shed (503, Retry-After)
    redis_pool_timeout_seconds: float = Field(default=0.25, gt=0)
    #: shim processes that share the rate limits when Redis is unreachable (each then allows its
    #: share, limit / this, in-process); 0: ``workers``.  Set it to replicas x workers.
    rate_limit_processes: int = Field(default=0, ge=0)
    #: largest request head (request line and headers, bytes); larger answers 431 and the connection closes
    max_header_bytes: int = Field(default=16384, ge=1024)
    #: seconds a request head may take to arrive (from the connection's start or the request's first byte); 408
    header_timeout_seconds: float = Field(default=10, gt=0)
    #: seconds a request body may take to arrive after its head; later answers 408 and the connection closes
    body_timeout_seconds: float = Field(default=10, gt=0)
    #: seconds an idle keep-alive connection stays open (behind a proxy: longer than the proxy's idle timeout)
    keep_alive_seconds: int = Field(default=5, gt=0)
    #: proxies (IPs or CIDRs) whose X-Forwarded-For names the client; empty: the header is ignored
    trusted_proxies: tuple[IPvAnyNetwork, ...] = ()

    @property
    def rate_limit_share_of(self) -> int:
        """How many processes the configured limits are divided among when Redis is unreachable."""
        return self.rate_limit_processes or self.workers


class MetricsSettings(_Section):
    #: address the worker pool's and the relay's metrics listen on (the shim serves /metrics on its own port)
    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, lt=65536)


class LoggingSettings(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class TracingSettings(_Section):
    """OpenTelemetry tracing (:mod:`worker.tracing`); off unless this or the standard OTEL_* variables ask for it."""

    #: base URL of an OTLP/HTTP collector (``http://otel-collector:4318``; ``/v1/traces`` is added);
    #: "" = off, unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_TRACES_EXPORTER`` turn it on
    otlp_endpoint: str = ""
    #: callers (IPs or CIDRs, as the shim sees them after ``shim.trusted_proxies``) whose ``traceparent``
    #: the shim continues; anyone else's request starts a trace of its own, linked to the caller's context
    trust_incoming: tuple[IPvAnyNetwork, ...] = ()


class PaymentsSettings(_Section):
    """What money the service takes: ``live`` (the default), or ``test`` (the providers' test keys and sandboxes).

    Production mode refuses Stripe test keys and PayPal's sandbox unless ``mode: test`` says so
    explicitly; ``orders doctor`` then says loudly that the service takes test money.
    """

    mode: Literal["live", "test"] = "live"


class ConsoleSettings(_Section):
    """The operators' web console at ``/console`` (:mod:`worker.shim.console`), served by the shim to admins."""

    #: None (the default): on in development, off in production until set (:attr:`Settings.console_enabled`)
    enabled: bool | None = None
    #: HMAC-SHA256 key of the console's session cookies and CSRF tokens (production: 32 bytes or more)
    session_secret: SecretStr = SecretStr("")
    #: how long a console session lasts after its login link was used
    session_minutes: int = Field(default=480, gt=0, le=7 * 24 * 60)
    #: how long a login link printed by ``orders console login`` may be used (once)
    login_link_seconds: int = Field(default=300, gt=0, le=3600)
    #: the shim's URL as the operator's browser reaches it, for the login link; "" = http://shim.host:shim.port
    public_url: str = ""
    #: seconds between two refreshes of the at-a-glance page in the browser
    refresh_seconds: int = Field(default=5, ge=1, le=3600)
    #: the dead-letter index is checked against the queue's depth when a page is older than this (seconds)
    dead_letter_index_seconds: float = Field(default=10, gt=0)


Environment = Literal["production", "development"]


class Settings(_Section):
    #: ``production`` (the default) refuses development secrets and non-provider hosts at start
    #: (:mod:`worker.production`); ``development`` is set by the local scripts, the tests and compose.yml
    environment: Environment = "production"
    database: DatabaseSettings
    redis: RedisSettings
    rabbitmq: RabbitSettings
    stripe: StripeSettings
    paypal: PayPalSettings
    payments: PaymentsSettings = PaymentsSettings()
    worker: WorkerSettings = WorkerSettings()
    orders: OrdersSettings = OrdersSettings()
    relay: RelaySettings = RelaySettings()
    shim: ShimSettings
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    tracing: TracingSettings = TracingSettings()
    console: ConsoleSettings = ConsoleSettings()
    #: broker user -> what it may send (docs/security.md).  The service's own user (``rabbitmq.url``'s)
    #: may send everything.  Empty in development: every sender may (the open behaviour of a local
    #: set-up); in production a command from a user not listed here is refused.
    senders: dict[Annotated[str, BeforeValidator(_sender_name)], SenderGrant] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _service_user_not_mapped(self) -> Settings:
        if self.rabbitmq.user in self.senders:
            raise ValueError(
                f"senders names {self.rabbitmq.user!r}, the service's own broker user (rabbitmq.url), which may "
                "send everything; give upstream services users of their own"
            )
        return self

    @property
    def console_enabled(self) -> bool:
        """``console.enabled``, or when unset: on in development, off in production."""
        if self.console.enabled is not None:
            return self.console.enabled
        return self.environment == "development"


def _wants_json(section: str, key: str | None) -> bool:
    """Whether the setting is a list or a mapping (its environment value is JSON) rather than a scalar."""
    field = Settings.model_fields.get(section)
    if field is None:
        return False
    annotation = field.annotation
    if key is not None:
        sub = getattr(annotation, "model_fields", {}).get(key)
        if sub is None:
            return False
        annotation = sub.annotation
    return get_origin(annotation) in (list, tuple, dict) or annotation in (list, tuple, dict)


def _overlay_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``ORDERS_<SECTION>__<KEY>`` sets one key of a section, ``ORDERS_<KEY>`` a top-level key.

    A string setting takes the value as it is (``""`` is an empty string);
    only list and mapping settings parse it as JSON.
    """
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in Settings.model_fields:
            continue
        value: Any = raw
        if _wants_json(section, key if sep else None):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise SettingsError(f"{name}: not valid JSON ({exc.msg})") from None
        if not sep:
            data[section] = value
            continue
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise SettingsError(f"{section}: expected a mapping")
        data[section][key] = value


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the file, apply environment overrides and validate."""
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get("ORDERS_CONFIG") or DEFAULT_CONFIG)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise SettingsError(f"configuration file {path} not found (set ORDERS_CONFIG)") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"configuration file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"configuration file {path}: expected a mapping at the top")
    _overlay_environment(data, environ)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if not loc:  # a rule across sections
                problems.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            # a mapping setting (``senders``) is set from the environment as a whole, in JSON
            whole = _wants_json(loc[0], None) and get_origin(Settings.model_fields[loc[0]].annotation) is dict
            env = ENV_PREFIX + "__".join(loc[:1] if whole else loc[:2]).upper()
            problems.append(f"{'.'.join(loc)} ({env}): {err['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
