"""The world of one run (:class:`Stack`): its database and vhost, the payment fakes, Redis, the proxies
and the service's own processes, started through the real ``orders`` CLI; and the outages it is put through.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pika

from schema.topology import EVENTS_EXCHANGE, INVENTORY_EXCHANGE
from scripts import harness
from scripts.fakes import paypal_certs
from scripts.harness import ORDERS_CLI, HarnessError, Proc, RabbitNode, RedisServer
from scripts.tcp_proxy import free_port
from worker.rabbit.connection import connection_parameters
from worker.rabbit.users import DEFAULT_SENDERS
from worker.settings import load_settings

from .config import (
    CAPTURE_QUEUE,
    CATALOGUE,
    HMAC_SECRET,
    JWT_SECRET,
    ROOT,
    ChaosConfig,
    ChaosError,
    say,
)
from .processes import POOL_CHILDREN, ClusterServers, ProxyProcess, RealServices, private_redis, run_command

FAKES = ROOT / "scripts" / "fakes"
#: payment-provider client timeout; injected delays are longer, so they time out
CLIENT_TIMEOUT = 2.0
INJECTED_DELAY = 3.0


class Stack:
    """Database, vhost, fakes, Redis, proxies and the service's processes of one run."""

    def __init__(self, cfg: ChaosConfig, tmp: Path) -> None:
        self.cfg, self.tmp = cfg, tmp
        self.procs: list[Proc] = []
        self.fakes: dict[str, Proc] = {}
        self.fake_urls: dict[str, str] = {}
        self.proxy: ProxyProcess | None = None
        self.redis: RedisServer | None = None
        self.real = RealServices() if cfg.real_restarts and cfg.topology == "single" else None
        self.cluster = ClusterServers() if cfg.topology == "cluster" else None
        #: ``--private-rabbit``: the run's own RabbitMQ node (behind the proxy), started in :meth:`prepare`
        self.rabbit: RabbitNode | None = None
        #: the harness's rabbitmqctl before a cluster run pointed it at the cluster (restored at the end)
        self._rabbitmqctl_before: str | None = os.environ.get("ORDERS_TEST_RABBITMQCTL")
        self.outage: str | None = None  # the dependency currently away (restored on exit)
        base = load_settings(
            environ={
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("ORDERS_DATABASE__DBNAME", "ORDERS_RABBITMQ__URL"))
            }
        )
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
        #: PayPal's side of webhook signing: the CA the service trusts (cert_ca_file), the https
        #: certificate host (the PayPal fake's second listener) and the signing certificate
        self.paypal_pki = paypal_certs.TestAuthority("Chaos PayPal Root CA")
        self.paypal_ca_file = self.tmp / "paypal-ca.pem"
        self.paypal_cert_base = ""  # https://127.0.0.1:<port>/_fake/certs, once the fake runs
        #: the upstream senders' broker users of this run (role -> user, user -> password) and the sender map
        #: the service runs with: the load publishes as them (docs/security.md, "Senders have identities")
        self.senders = {role: f"{cfg.vhost}-{role}" for role in DEFAULT_SENDERS}
        self.sender_passwords: dict[str, str] = {}

    # urls and environments

    def amqp_url(self, port: int | None = None) -> str:
        """The run's vhost on the broker (every node of the cluster, comma-separated, in cluster mode)."""
        vhost = quote(self.cfg.vhost, safe="")
        if self.cluster is not None:
            nodes = self.cluster.env["ORDERS_RABBITMQ__URL"].split(",")
            return ",".join(f"amqp://{urlsplit(node).netloc}/{vhost}" for node in nodes)
        return f"amqp://{self.amqp_auth}@{self.amqp_host}:{port or self.amqp_port}/{vhost}"

    def sender_url(self, role: str) -> str:
        """The run's vhost as the sender ``role`` (shop, fulfilment, payments, backoffice) sees it."""
        user = self.senders[role]
        auth = f"{quote(user, safe='')}:{quote(self.sender_passwords[user], safe='')}"
        return ",".join(
            f"amqp://{auth}@{urlsplit(node).netloc.rsplit('@', 1)[-1]}{urlsplit(node).path}"
            for node in self.amqp_url().split(",")
        )

    def sender_map(self) -> dict[str, Any]:
        """The ``senders`` setting of the run: the default roles under the run's user names."""
        found: dict[str, Any] = {}
        for role, (commands, admin, providers) in DEFAULT_SENDERS.items():
            grant: dict[str, Any] = {"commands": list(commands)}
            if admin:
                grant["admin"] = True
            if providers:
                grant["providers"] = list(providers)
            found[self.senders[role]] = grant
        return found

    def env(self, direct: bool = False) -> dict[str, str]:
        """The service's environment; ``direct`` bypasses the proxies (the script's own tools)."""
        proxied = self.proxy is not None and not direct
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
        if "ORDERS_CONFIG" in os.environ:
            env["ORDERS_CONFIG"] = os.environ["ORDERS_CONFIG"]
        for key in ("ORDERS_DATABASE__HOST", "ORDERS_DATABASE__USER", "ORDERS_DATABASE__PASSWORD"):
            if key in os.environ:
                env[key] = os.environ[key]
        database_port = str(self.proxy.ports["postgres"] if proxied and self.proxy else self.pg_port)
        if self.cluster is not None:  # the cluster's own hosts, ports and user; no proxies in between
            env.update({k: v for k, v in self.cluster.env.items() if k.startswith("ORDERS_DATABASE__")})
            database_port = self.cluster.env["ORDERS_DATABASE__PORT"]
        env.update(
            {
                "ORDERS_ENVIRONMENT": "development",  # the fakes and the shipped development secrets
                "ORDERS_DATABASE__DBNAME": self.cfg.database,
                "ORDERS_DATABASE__PORT": database_port,
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
                # the fake's https listener: its host and port (a host alone means port 443)
                "ORDERS_PAYPAL__CERT_HOST_ALLOWLIST": json.dumps(
                    [urlsplit(self.paypal_cert_base).netloc or "127.0.0.1"]
                ),
                "ORDERS_PAYPAL__CERT_CA_FILE": str(self.paypal_ca_file),
                "ORDERS_WORKER__RETRY_DELAYS_SECONDS": json.dumps(list(self.cfg.retry_delays)),
                "ORDERS_WORKER__PAYMENT_CONCURRENCY": str(self.cfg.payment_concurrency),
                # below the sum of the delay tiers, so a capture that never went out settles before they run out
                "ORDERS_WORKER__CAPTURE_SETTLE_SECONDS": str(max(1, sum(self.cfg.retry_delays) // 2)),
                "ORDERS_WORKER__LIVENESS_FILE": str(self.tmp / "alive"),
                "ORDERS_WORKER__SHUTDOWN_TIMEOUT_SECONDS": "10",
                "ORDERS_SHIM__JWT_SECRET": JWT_SECRET,
                "ORDERS_SHIM__WEBHOOK_HMAC_SECRET": HMAC_SECRET,
                "ORDERS_SHIM__PLACE_RATE_PER_MINUTE": "1000000",
                "ORDERS_SHIM__READ_RATE_PER_MINUTE": "1000000",
                "ORDERS_SHIM__PLACE_RATE_PER_MINUTE_PER_ADDRESS": "1000000",
                "ORDERS_SHIM__READ_RATE_PER_MINUTE_PER_ADDRESS": "1000000",
                "ORDERS_SHIM__WEBHOOK_RATE_PER_MINUTE_PER_ADDRESS": "1000000",  # every webhook comes from 127.0.0.1
                "ORDERS_METRICS__PORT": "0",
                "ORDERS_LOGGING__FORMAT": "json",
                "ORDERS_LOGGING__LEVEL": "INFO",
                "ORDERS_SENDERS": json.dumps(self.sender_map()),
                "ORDERS_ORDERS__PAYMENT_TIMEOUT_MINUTES": str(self.cfg.payment_timeout_minutes),
                "ORDERS_ORDERS__EXPIRY_SWEEP_SECONDS": "2",
            }
        )
        return env

    def settings(self, direct: bool = True) -> Any:
        return load_settings(environ=self.env(direct))

    def direct_dsn(self) -> str:
        return self.settings(direct=True).database.dsn

    def cli(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [ORDERS_CLI, *args], env=self.env(direct=True), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise ChaosError(f"orders {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
        return done

    # set up

    def prepare(self) -> None:
        if self.cfg.private_rabbit and self.cluster is None and not self.cfg.real_restarts:
            say("starting the run's own RabbitMQ node")
            try:
                self.rabbit = RabbitNode(
                    Path(tempfile.mkdtemp(prefix="orders-chaos-rabbit-")), f"orders-chaos-{os.getpid()}"
                )
                self.rabbit.start()
            except HarnessError as exc:
                raise ChaosError(str(exc)) from None
            os.environ["ORDERS_TEST_RABBITMQCTL"] = f"rabbitmqctl -n {self.rabbit.name}"  # the harness's vhost tools
            self.amqp_host, self.amqp_port, self.amqp_auth = "127.0.0.1", self.rabbit.port, "guest:guest"
        if self.cluster is not None:
            say("bringing the cluster up (scripts/cluster.sh up)")
            self.cluster.up()
            os.environ["ORDERS_TEST_RABBITMQCTL"] = self.cluster.rabbitmqctl()  # the harness's vhost tools
            self.amqp_auth = urlsplit(self.cluster.env["ORDERS_RABBITMQ__URL"].split(",")[0]).netloc.rsplit("@", 1)[0]
        self._vhost()
        self._fakes()
        if self.cluster is not None:
            self.redis = private_redis(self.tmp / "redis.log")
            self.redis_port = self.redis.port
        elif self.cfg.real_restarts:
            self.redis_port = 6379
        else:
            self.redis = private_redis(self.tmp / "redis.log")
            self.redis_port = self.redis.port
            self.proxy = ProxyProcess({"postgres": self.pg_port, "rabbitmq": self.amqp_port}, self.tmp / "proxy.log")
        self._database()
        self.cli("topology")
        self.cli("products", "import", str(CATALOGUE))
        self._capture_queue()

    def _vhost(self) -> None:
        if not harness.have_rabbitmqctl():
            raise ChaosError("rabbitmqctl is needed to create the run's own vhost")
        try:  # a clean slate
            harness.create_vhost(self.cfg.vhost, self.amqp_auth.split(":")[0], fresh=True)
            self.sender_passwords = harness.sender_users(self.cfg.vhost, self.senders.values())
        except HarnessError as exc:
            raise ChaosError(str(exc)) from None

    def _database(self) -> None:
        self._drop_database()
        self.cli("migrate")

    def _drop_database(self) -> None:
        harness.drop_database(self.settings(direct=True).database)

    def _fakes(self) -> None:
        self.paypal_pki.write_ca(self.paypal_ca_file)
        tls_cert, tls_key = paypal_certs.write_tls(self.paypal_pki.tls_cert(), self.tmp)
        tls_port = free_port()
        self.paypal_cert_base = f"https://127.0.0.1:{tls_port}/_fake/certs"
        https = {
            "stripe": [],
            "paypal": ["--tls-port", str(tls_port), "--tls-cert", str(tls_cert), "--tls-key", str(tls_key)],
        }
        for name, module in (("stripe", "fake_stripe.py"), ("paypal", "fake_paypal.py")):
            port = free_port()
            proc = Proc(
                f"fake-{name}",
                [sys.executable, str(FAKES / module), "--port", str(port), *https[name]],
                dict(os.environ),
                self.tmp / f"fake-{name}.log",
                say=say,
            )
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
        specs = [
            {"rate": status, "seed": seed, "status": 503},
            {"rate": drop_rate, "seed": seed + 1, "drop": True},
            {"rate": delay_rate, "seed": seed + 2, "delay": INJECTED_DELAY},
        ]
        for url in self.fake_urls.values():
            for spec in specs:
                httpx.post(url + "/_fake/faults", json=spec, timeout=5).raise_for_status()
        return {
            "5xx": status,
            "dropped connection": drop,
            f"{INJECTED_DELAY:.0f}s delay (client timeout {CLIENT_TIMEOUT:.0f}s)": delay,
        }

    def faults_off(self) -> None:
        for url in self.fake_urls.values():
            with contextlib.suppress(httpx.HTTPError):
                httpx.delete(url + "/_fake/faults", timeout=5)

    def _capture_queue(self) -> None:
        conn = pika.BlockingConnection(connection_parameters(self.amqp_url(), 60))
        ch = conn.channel()
        ch.queue_declare(CAPTURE_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(CAPTURE_QUEUE, INVENTORY_EXCHANGE, routing_key="#")
        ch.queue_bind(CAPTURE_QUEUE, EVENTS_EXCHANGE, routing_key="#")
        conn.close()

    def start_service(self) -> None:
        env = self.env()
        self.pool = Proc(
            "worker pool",
            [ORDERS_CLI, "worker", "--processes", str(self.cfg.processes)],
            env,
            self.tmp / "worker.log",
            say=say,
        )
        self.procs.append(self.pool)
        for name in ("relay-a", "relay-b"):
            relay = Proc(name, [ORDERS_CLI, "relay"], env, self.tmp / f"{name}.log", say=say)
            self.relays.append(relay)
            self.procs.append(relay)
            time.sleep(1.0)  # relay-a becomes the active one
        self.shim_port = free_port()
        self.shim = Proc(
            "shim", [ORDERS_CLI, "shim", "--port", str(self.shim_port)], env, self.tmp / "shim.log", say=say
        )
        self.procs.append(self.shim)
        deadline = time.monotonic() + 60
        while True:
            try:
                if (
                    httpx.get(self.shim_url + "/readyz", timeout=2).status_code == 200
                    and len(self.pool.children(POOL_CHILDREN)) == self.cfg.processes
                ):
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
                elif ev in ("standing by", "dependency lost", "dependency unavailable, retrying"):
                    state = "other"
            if state == "active":
                return relay
        return None

    # dependencies away and back

    def down(self, name: str) -> None:
        """Take ``name`` (rabbitmq, postgres, redis) away; :meth:`up` brings it back."""
        self.outage = name
        stop, _ = self._switches(name)
        stop()

    def up(self, name: str) -> None:
        _, start = self._switches(name)
        start()
        self.outage = None

    def _switches(self, name: str) -> tuple[Callable[[], None], Callable[[], None]]:
        """How ``name`` is taken away and brought back: the machine's server, or the run's proxy or Redis."""
        if self.cluster is not None and name != "redis":
            raise ChaosError(f"a cluster is not taken away whole ({name}): its nodes are, one at a time")
        if self.real:
            return {
                "rabbitmq": (self.real.rabbit_stop, self.real.rabbit_start),
                "postgres": (self.real.postgres_restart, lambda: None),  # a restart: down and up in one
                "redis": (self.real.redis_stop, self.real.redis_start),
            }[name]
        if name == "redis":
            assert self.redis is not None
            return self.redis.stop, self.redis.start
        assert self.proxy is not None
        return partial(self.proxy.down, name), partial(self.proxy.up, name)

    def restore(self) -> None:
        """Bring back whatever dependency an interrupted injection left away (or lift its alarm)."""
        outage, self.outage = self.outage, None
        with contextlib.suppress(Exception):
            if outage == "alarm":
                self.alarm(False)
            elif outage is not None:
                self.up(outage)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(20)
        self.restore()
        for p in self.fakes.values():
            p.stop(5)
        if self.proxy is not None:
            self.proxy.stop()
        if self.redis is not None:
            self.redis.stop()

    def remove_cluster(self) -> None:
        """The cluster, when this run brought it up, or the run's own RabbitMQ node (after the database and
        vhost are dropped)."""
        if self.cluster is not None:
            self.cluster.down_if_ours()
        if self.rabbit is not None:
            self.rabbit.remove()

    # a resource alarm on the run's own broker

    def alarm(self, on: bool) -> str:
        """Raise (or lift) a disk alarm on the run's own broker: the private node, or a cluster's first node
        (an alarm blocks publishers on every node of a cluster).  Never on the machine's shared node."""
        self.outage = "alarm" if on else None
        if self.rabbit is not None:
            self.rabbit.disk_alarm(on)
            return self.rabbit.name
        if self.cluster is not None:
            node = self.cluster.nodes[0]
            run_command(["rabbitmqctl", "-n", node, "-q", "set_disk_free_limit", "1000000GB" if on else "50MB"])
            return node
        raise ChaosError("a resource alarm needs a broker of the run's own (--private-rabbit or --topology cluster)")

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            self._drop_database()
        with contextlib.suppress(Exception):
            harness.delete_vhost(self.cfg.vhost)
        with contextlib.suppress(Exception):
            harness.delete_users(self.senders.values())

    def restore_rabbitmqctl(self) -> None:
        """The harness's rabbitmqctl as it was before a cluster run (or the run's own node) took it over."""
        if self.cluster is None and self.rabbit is None:
            return
        if self._rabbitmqctl_before is None:
            os.environ.pop("ORDERS_TEST_RABBITMQCTL", None)
        else:
            os.environ["ORDERS_TEST_RABBITMQCTL"] = self._rabbitmqctl_before
