"""The processes a run starts and the dependencies it takes away.

:class:`Proc` is one service process (own session, JSON log); :class:`ProxyProcess`
the loopback TCP proxies to PostgreSQL and RabbitMQ, in a child process
(``python -m scripts.chaos _proxy``, served by :func:`proxy_main`);
:class:`PrivateRedis` a redis-server of the run's own; :class:`RealServices` the
machine's servers, for ``--real-restarts``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from scripts.tcp_proxy import TcpProxy, free_port

from .config import ROOT, ChaosError, say

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
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
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
    """Loopback TCP proxies in a child process (``python -m scripts.chaos _proxy``), cut and restored on command.

    A separate process keeps the forwarding off this process's GIL.  Its
    stdin is the control channel; when the run dies, stdin closes and the
    proxies go with it.
    """

    def __init__(self, targets: dict[str, int], log: Path) -> None:
        argv = [sys.executable, "-m", "scripts.chaos", "_proxy", *(f"{k}={v}" for k, v in targets.items())]
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            text=True,
            start_new_session=True,
            cwd=ROOT,
        )
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


class PrivateRedis:
    """A redis-server of the run's own, on a free port, that can be stopped and started again."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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
