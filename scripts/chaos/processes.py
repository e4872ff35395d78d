"""The processes a run starts and the dependencies it takes away.

:class:`~scripts.harness.Proc` (the harness's) is one service process (own session,
JSON log); :class:`ProxyProcess` the loopback TCP proxies to PostgreSQL and RabbitMQ,
in a child process (``python -m scripts.chaos _proxy``, served by :func:`proxy_main`);
:func:`private_redis` a redis-server of the run's own (the harness's
:class:`~scripts.harness.RedisServer`); :class:`RealServices` the machine's servers,
for ``--real-restarts``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from scripts import harness
from scripts.harness import HarnessError, Proc, RedisServer
from scripts.tcp_proxy import TcpProxy

from .config import ROOT, ChaosError

HZ = os.sysconf("SC_CLK_TCK")


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


#: a worker pool's children (their process titles), as :meth:`Proc.children` is asked for them
POOL_CHILDREN = (b"worker [", b"orders")


class ProxyProcess:
    """Loopback TCP proxies in a child process (``python -m scripts.chaos _proxy``), cut and restored on command.

    A separate process keeps the forwarding off this process's GIL.  Its
    stdin is the control channel; when the run dies, stdin closes and the
    proxies go with it.
    """

    def __init__(self, targets: dict[str, int], log: Path) -> None:
        argv = [sys.executable, "-m", "scripts.chaos", "_proxy", *(f"{k}={v}" for k, v in targets.items())]
        self.proc = Proc("tcp proxy", argv, None, log, pipes=True, cwd=ROOT)
        self.popen = self.proc.popen
        assert self.popen is not None and self.popen.stdout is not None
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
        """Close its stdin (the proxies go down with the process), then make sure it is gone."""
        assert self.popen is not None
        with contextlib.suppress(OSError, ValueError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self.proc.stop(5)


def proxy_main(specs: list[str]) -> int:
    """The proxy process: ``name=port`` per proxy; prints their ports as JSON, then obeys ``down``/``up NAME``."""
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


def private_redis(log: Path) -> RedisServer:
    """A redis-server of the run's own, on a free port, that can be stopped and started again."""
    try:
        return RedisServer(log)
    except HarnessError as exc:
        raise ChaosError(str(exc)) from None


def run_command(argv: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool (rabbitmqctl, pg_ctlcluster, …) to its end; ChaosError on failure when ``check``."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise ChaosError(f"{' '.join(argv)} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-1500:]}")
    return done


class RealServices:
    """``--real-restarts``: the machine's own servers, restarted as an operator would."""

    def rabbit_stop(self) -> None:
        run_command(["rabbitmqctl", "stop_app"])

    def rabbit_start(self) -> None:
        run_command(["rabbitmqctl", "start_app"])

    def postgres_restart(self) -> None:
        versions = sorted(os.listdir("/etc/postgresql"))
        run_command(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"])

    def redis_stop(self) -> None:
        run_command(["redis-cli", "shutdown", "nosave"], check=False)

    def redis_start(self) -> None:
        run_command(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
        )


class ClusterServers:
    """``--topology cluster``: the 3-node RabbitMQ cluster and the PostgreSQL primary + synchronous standby of
    ``scripts/cluster.sh``, and the faults a cluster is put through (a node stopped, the primary failed over)."""

    def __init__(self) -> None:
        self.env: dict[str, str] = {}
        #: brought up by this run (removed again at its end); a cluster that was there is left running
        self.ours = False

    def _run(self, *args: str, timeout: float = 600) -> str:
        return run_command(["bash", str(harness.CLUSTER_SCRIPT), *args], timeout=timeout).stdout

    def up(self) -> dict[str, str]:
        """Bring the cluster up (a standby failed over last run is rebuilt) and read its settings."""
        self.ours = not harness.cluster_exists()
        try:
            self.env = harness.cluster_up()
        except HarnessError as exc:
            raise ChaosError(str(exc)) from None
        return self.env

    @property
    def nodes(self) -> list[str]:
        return self.env.get("CLUSTER_RABBITMQ_NODES", "").split()

    def rabbitmqctl(self) -> str:
        """The rabbitmqctl that administers the cluster (its first node)."""
        return harness.cluster_rabbitmqctl(self.env)

    def leader(self, queue: str, vhost: str) -> int:
        """The number (1-3) of the node leading ``queue``."""
        name = self._run("leader", queue, vhost, timeout=120).strip()
        for i, node in enumerate(self.nodes, 1):
            if node == name:
                return i
        raise ChaosError(f"{queue} is led by {name!r}, not a node of the cluster")

    def down_if_ours(self) -> None:
        if self.ours:
            harness.cluster_down()

    def rabbit_stop(self, n: int) -> None:
        self._run("rabbit-stop", str(n), timeout=180)

    def rabbit_start(self, n: int) -> None:
        self._run("rabbit-start", str(n), timeout=300)

    def failover(self) -> str:
        """Stop the primary with ``-m immediate`` and promote the standby; what the script says of it."""
        lines = self._run("failover", timeout=300).strip().splitlines()
        return lines[-1] if lines else "failed over"
