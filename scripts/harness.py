"""The one harness of the tests, the benchmarks and the chaos run.

What each of them needs around the service, in one place:

* :class:`Proc`: a process (``orders worker``, ``orders relay``, ``orders shim``,
  a payment fake, a proxy) started in a session of its own, so that the whole
  group (a pool's children included) can be signalled and killed; its output
  goes to a log file.  Every process started here and still running is killed
  when the Python process ends: at exit (``atexit``), and on SIGTERM or SIGHUP
  (a killed pytest or benchmark leaves no orphans behind).
* :class:`RedisServer`: a ``redis-server`` of the caller's own, on a free port.
* :class:`RabbitNode`: a RabbitMQ node of the caller's own (root), for alarms and stops that the
  machine's shared node must never see.
* :func:`fresh_database` / :func:`drop_database`: a database made anew and migrated.
* :func:`create_vhost` / :func:`delete_vhost`: a RabbitMQ vhost of the caller's own,
  through ``rabbitmqctl`` (no management plugin needed).  The command is
  ``rabbitmqctl`` unless ``ORDERS_TEST_RABBITMQCTL`` names another (for example
  ``docker exec <container> rabbitmqctl`` for a broker in a container).
* :func:`queue_depth` / :func:`queue_depths`: messages ready in a queue (passive declare).
* :func:`wait_until`: poll a condition until it holds or a deadline passes.
* :func:`choose_servers` / :class:`Containers`: a test run's servers, the configured
  ones that answer, else PostgreSQL, RabbitMQ and Redis in Docker (testcontainers);
  ``ORDERS_TEST_SERVERS=local|containers`` forces one.

Nothing here imports the service at module level, so the unit tests can import it
without a server in sight.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

#: the service's CLI, next to the interpreter running the caller (the venv's)
ORDERS_CLI = str(Path(sys.executable).parent / "orders")
#: seconds one rabbitmqctl call may take
RABBITMQCTL_TIMEOUT = 60.0


class HarnessError(Exception):
    """A set-up step failed (a vhost could not be made, a server did not start)."""


class WaitTimeout(AssertionError):
    """:func:`wait_until` gave up (an AssertionError, so a test reports it as a failure)."""


# -- waiting ------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or raise :class:`WaitTimeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


# -- processes ------------------------------------------------------------------------------

_LIVE: set[Proc] = set()
_LIVE_LOCK = threading.Lock()
_REAPER_INSTALLED = False


def kill_all() -> None:
    """SIGKILL the process group of every :class:`Proc` still running (at exit, on SIGTERM/SIGHUP)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        p.kill_group(wait=False)


def _on_signal(signum: int, frame: Any, previous: Any) -> None:
    if callable(previous):  # the caller's own handler does its clean-up; at exit we still reap
        previous(signum, frame)
        return
    kill_all()
    signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    os.kill(os.getpid(), signum)


def _install_reaper() -> None:
    """Once per process: kill what is left at exit and when SIGTERM or SIGHUP ends us."""
    global _REAPER_INSTALLED
    if _REAPER_INSTALLED:
        return
    _REAPER_INSTALLED = True
    atexit.register(kill_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN:
            continue
        signal.signal(signum, lambda s, f, prev=previous: _on_signal(s, f, prev))


class Proc:
    """A process of the caller's, in its own session (``kill_group`` reaches its children).

    Output (stdout and stderr) is appended to ``log``; with ``pipes`` stdin and
    stdout are text pipes to the caller instead and only stderr goes to the log.
    ``log=None`` leaves both to the caller's; ``log=subprocess.DEVNULL`` drops
    stdout and leaves stderr to the caller's.
    ``say`` is told when a process does not stop in time.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None,
        log: Path | int | None,
        *,
        pipes: bool = False,
        cwd: str | Path | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.name, self.argv, self.env, self.log = name, list(argv), env, log
        self.pipes, self.cwd, self.say = pipes, cwd, say
        self.popen: subprocess.Popen[Any] | None = None
        self.starts = 0
        self.offset = 0
        self.start()

    @classmethod
    def orders(cls, args: Iterable[str], env: dict[str, str], log: Path, name: str = "", **kw: Any) -> Proc:
        """``orders ARGS…`` through the real CLI."""
        args = list(args)
        return cls(name or args[0], [ORDERS_CLI, *args], env, log, **kw)

    def start(self) -> None:
        _install_reaper()
        out: IO[bytes] | int | None = self.log if not isinstance(self.log, Path) else None
        if isinstance(self.log, Path):
            self.offset = self.log.stat().st_size if self.log.exists() else 0
            out = self.log.open("ab")
        try:
            if self.pipes:
                self.popen = subprocess.Popen(
                    self.argv,
                    env=self.env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=out,
                    text=True,
                    start_new_session=True,
                    cwd=self.cwd,
                )
            else:
                self.popen = subprocess.Popen(
                    self.argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT if isinstance(self.log, Path) else None,
                    start_new_session=True,
                    cwd=self.cwd,
                )
        finally:
            if not isinstance(out, int | None):
                out.close()  # the child holds its own copy
        self.starts += 1
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def children(self, matching: tuple[bytes, ...] = ()) -> list[int]:
        """Direct children's pids (those whose command line holds one of ``matching``, when given)."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True, check=False).stdout
        kids = []
        for p in out.split():
            if matching:
                try:
                    cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
                except OSError:
                    continue
                if not any(m in cmdline for m in matching):
                    continue
            kids.append(int(p))
        return kids

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL the process alone (its children live on, as after a crash of the parent)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            assert self.popen is not None
            self.popen.wait(timeout)

    def kill_group(self, wait: bool = True) -> None:
        """SIGKILL the whole group: the process and everything it started."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(30)
            self._forget()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait up to ``timeout``; then SIGKILL the group (no orphans either way). The exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.say is not None:
                    self.say(f"{self.name} did not stop within {timeout:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # no orphans (pool children included)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        if self.pipes:
            for stream in (self.popen.stdin, self.popen.stdout):
                with contextlib.suppress(OSError, ValueError):
                    if stream is not None:
                        stream.close()
        self._forget()
        return self.popen.returncode

    def _forget(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def tail(self, n: int = 1500) -> str:
        if not isinstance(self.log, Path):
            return ""
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_events(self, current_only: bool = False) -> list[dict[str, Any]]:
        """The JSON log lines (of the running incarnation only, with ``current_only``)."""
        events: list[dict[str, Any]] = []
        if not isinstance(self.log, Path):
            return events
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


def free_port() -> int:
    from scripts.tcp_proxy import free_port as _free_port

    return _free_port()


class RedisServer:
    """A ``redis-server`` of the caller's own on a free loopback port; :meth:`stop` and :meth:`start` again."""

    def __init__(self, log: Path, port: int | None = None, timeout: float = 10) -> None:
        self.port = port or free_port()
        self.log, self.timeout = log, timeout
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        import redis

        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.proc is None:
            self.proc = Proc("redis-server", argv, None, self.log)
        else:
            self.proc.start()
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            wait_until(lambda: _pings(client), timeout=self.timeout, interval=0.1, what="a private redis-server")
        except WaitTimeout:
            raise HarnessError(f"private redis-server did not start (see {self.log})") from None
        finally:
            client.close()

    def stop(self) -> None:
        """SIGKILL: Redis is gone at once, as in a crash."""
        if self.proc is not None and self.proc.alive():
            self.proc.kill_group()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# -- PostgreSQL ------------------------------------------------------------------------------


def drop_database(database: Any) -> None:
    """Drop the database the settings name (``settings.database``), sessions and all."""
    from worker import db

    db.drop_database(database)


def fresh_database(database: Any, migrate: bool = True) -> None:
    """Drop the database the settings name, create it anew and (``migrate``) bring its schema to head."""
    from worker import db

    db.drop_database(database)
    db.ensure_database(database)
    if migrate:
        engine = db.make_engine(database, pool_size=1)
        try:
            db.migrate(engine)
        finally:
            engine.dispose()


# -- RabbitMQ --------------------------------------------------------------------------------


def rabbitmqctl_argv() -> list[str]:
    """How rabbitmqctl is run: ``ORDERS_TEST_RABBITMQCTL`` (shell words) or ``rabbitmqctl``."""
    return shlex.split(os.environ.get("ORDERS_TEST_RABBITMQCTL", "")) or ["rabbitmqctl"]


# -- a RabbitMQ node of the caller's own ----------------------------------------------------------

#: where Debian's rabbitmq-server package puts the node's own scripts
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
#: the rabbitmq user's home: its Erlang cookie administers the node
RABBIT_HOME = "/var/lib/rabbitmq"


def can_run_private_rabbit() -> str | None:
    """Why :class:`RabbitNode` cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private RabbitMQ node runs as the rabbitmq user: needs root"
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        return "rabbitmq-server is not installed (Debian package rabbitmq-server)"
    return None


class RabbitNode:
    """A RabbitMQ node of the caller's own (``<name>@localhost``) on free loopback ports, run by the
    machine's rabbitmq-server as the rabbitmq user (root needed), as ``scripts/cluster.sh`` runs its nodes.

    For what must never be done to the machine's shared node (5672): resource alarms
    (:meth:`disk_alarm`), stops.  Its user is ``guest`` (loopback only); its data lives in ``directory``
    (removed by :meth:`remove`).
    """

    def __init__(self, directory: Path, name: str | None = None, boot_timeout: float = 120) -> None:
        self.name = f"{name or f'orders-private-{os.getpid()}'}@localhost"
        self.dir = Path(directory)
        self.port, self.dist_port = free_port(), free_port()
        self.boot_timeout = boot_timeout

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl_argv(self) -> list[str]:
        """rabbitmqctl for this node (root runs it as the rabbitmq user)."""
        return ["runuser", "-u", "rabbitmq", "--", "env", f"HOME={RABBIT_HOME}", str(RABBIT_BIN / "rabbitmqctl"),
                "-n", self.name]  # fmt: skip

    def ctl(self, *args: str, timeout: float = RABBITMQCTL_TIMEOUT, check: bool = True) -> str:
        try:
            done = subprocess.run(
                [*self.ctl_argv(), *args], capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HarnessError(f"rabbitmqctl -n {self.name} {args[0]} failed ({exc})") from None
        if check and done.returncode != 0:
            said = (done.stderr or done.stdout).strip()[-1500:]
            raise HarnessError(f"rabbitmqctl -n {self.name} {args[0]} failed ({done.returncode}): {said}")
        return done.stdout

    def start(self) -> RabbitNode:
        """Boot the node and wait until it runs; :class:`HarnessError` when it does not."""
        why = can_run_private_rabbit()
        if why:
            raise HarnessError(why)
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        # instead of /etc/rabbitmq/rabbitmq-env.conf (which names the machine's node)
        (self.dir / "rabbitmq-env.conf").write_text(
            'ERL_EPMD_ADDRESS=127.0.0.1\nexport ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        path = self.dir
        while path != path.parent:  # the rabbitmq user must reach it (mkdtemp makes 0700 directories)
            if path.stat().st_uid == os.geteuid():
                path.chmod(path.stat().st_mode | 0o755)
            path = path.parent
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.dir)], check=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": RABBIT_HOME,
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.dir / "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }
        argv = ["runuser", "-u", "rabbitmq", "--", "env", *(f"{k}={v}" for k, v in env.items())]
        done = subprocess.run(
            [*argv, str(RABBIT_BIN / "rabbitmq-server"), "-detached"],
            capture_output=True, text=True, timeout=60, check=False, cwd=str(self.dir),
        )  # fmt: skip
        if done.returncode != 0:
            raise HarnessError(f"rabbitmq-server {self.name} did not start: {done.stderr.strip()[-1500:]}")
        try:
            self.ctl("-q", "wait", "--timeout", str(int(self.boot_timeout)), str(self.dir / "pid"),
                     timeout=self.boot_timeout + 30)  # fmt: skip
        except HarnessError:
            logs = sorted((self.dir / "log").glob("*.log"))
            tail = logs[0].read_text(errors="replace")[-1500:] if logs else ""
            self.stop()
            raise HarnessError(f"{self.name} did not boot within {self.boot_timeout:.0f}s: {tail}") from None
        return self

    def disk_alarm(self, on: bool) -> None:
        """Raise a disk alarm (a free-disk limit no disk meets), or lift it: publishers are blocked meanwhile."""
        self.ctl("-q", "set_disk_free_limit", "1000000GB" if on else "50MB")

    def alarms(self) -> str:
        """What ``rabbitmq-diagnostics alarms`` would say, from the node's own status."""
        return self.ctl("-q", "eval", "rabbit_alarm:get_alarms().", check=False).strip()

    def blocked_connections(self) -> int:
        """Connections the node blocks now (a resource alarm met their publishing)."""
        return self.ctl("-q", "list_connections", "state", check=False).split().count("blocked")

    def stop(self) -> None:
        """Stop the node (and wait until its process is gone)."""
        pid = self.dir / "pid"
        with contextlib.suppress(HarnessError):
            self.ctl("-q", "stop", *([str(pid)] if pid.exists() else []), timeout=120, check=False)

    def remove(self) -> None:
        """Stop it and delete its data."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the cluster of scripts/cluster.sh ---------------------------------------------------------

CLUSTER_SCRIPT = Path(__file__).resolve().parent / "cluster.sh"


def cluster_settings(output: str) -> dict[str, str]:
    """The settings ``scripts/cluster.sh up|status|env`` prints: its ``export NAME='value'`` lines."""
    found = {}
    for line in output.splitlines():
        if line.startswith("export "):
            name, _, value = shlex.split(line)[1].partition("=")
            found[name] = value
    return found


def cluster_up(timeout: float = 900) -> dict[str, str]:
    """``scripts/cluster.sh up`` (idempotent; needs root) and the settings it prints; :class:`HarnessError`
    when it fails or prints none."""
    done = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise HarnessError(f"scripts/cluster.sh up failed: {done.stderr.strip()[-1500:]}")
    found = cluster_settings(done.stdout)
    if "ORDERS_RABBITMQ__URL" not in found or "ORDERS_DATABASE__HOST" not in found:
        raise HarnessError(f"scripts/cluster.sh up printed no settings: {done.stdout[-500:]}")
    return found


def cluster_exists() -> bool:
    """Whether ``scripts/cluster.sh up`` has made its cluster already (its settings file is there)."""
    return (Path(os.environ.get("CLUSTER_DIR", "/tmp/orders-cluster")) / "env").exists()


def cluster_down(timeout: float = 300) -> None:
    """``scripts/cluster.sh down``: stop and remove every node and PostgreSQL cluster it made."""
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], capture_output=True, text=True, timeout=timeout)


def cluster_rabbitmqctl(settings: Mapping[str, str]) -> str:
    """The rabbitmqctl that administers the cluster (its first node), for ``ORDERS_TEST_RABBITMQCTL``."""
    return "rabbitmqctl -n " + settings["CLUSTER_RABBITMQ_NODES"].split()[0]


def have_rabbitmqctl() -> bool:
    return shutil.which(rabbitmqctl_argv()[0]) is not None


def rabbitmqctl(
    *args: str, check: bool = False, timeout: float = RABBITMQCTL_TIMEOUT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """One rabbitmqctl call (``stdin``: what it reads, e.g. a password); :class:`HarnessError` when it cannot
    run, or fails and ``check``."""
    argv = [*rabbitmqctl_argv(), *args]
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"rabbitmqctl {args[0]} failed ({exc})") from None
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-1500:]
        raise HarnessError(f"rabbitmqctl {args[0]} failed ({done.returncode}): {said}")
    return done


def create_vhost(name: str, user: str = "guest", fresh: bool = False) -> None:
    """Make vhost ``name`` (anew, with ``fresh``) and give ``user`` every permission on it.

    :class:`HarnessError` when rabbitmqctl is missing or refuses.
    """
    if not have_rabbitmqctl():
        raise HarnessError(f"{rabbitmqctl_argv()[0]} not found")
    if fresh:
        rabbitmqctl("delete_vhost", name)
    rabbitmqctl("add_vhost", name, check=fresh)  # without fresh it may exist already
    rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*", check=True)


def sender_users(vhost: str, names: Iterable[str]) -> dict[str, str]:
    """Broker users that may only publish to ``orders.commands`` in ``vhost``, as ``orders topology --users``
    makes a sender (:func:`worker.rabbit.users.sender_permissions`), each with a fresh password: name ->
    password.  A user of that name is made anew.  :func:`delete_users` removes them."""
    from worker.rabbit.users import sender_permissions

    perms = sender_permissions()
    made = {}
    for name in names:
        password = secrets.token_urlsafe(18)
        rabbitmqctl("delete_user", name)
        rabbitmqctl("add_user", name, stdin=password + "\n", check=True)  # never on the command line
        rabbitmqctl("set_permissions", "-p", vhost, name, perms.configure, perms.write, perms.read, check=True)
        made[name] = password
    return made


def delete_users(names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(HarnessError):
            rabbitmqctl("delete_user", name)


def delete_vhost(name: str) -> bool:
    """Delete vhost ``name`` (and every queue in it); False when it could not be."""
    try:
        return rabbitmqctl("delete_vhost", name).returncode == 0
    except HarnessError:
        return False


def private_vhost_or_default(name: str, user: str = "guest") -> str:
    """``name`` once made (see :func:`create_vhost`), or ``""`` (the default vhost) when it cannot be."""
    try:
        create_vhost(name, user)
    except HarnessError:
        return ""
    return name


def vhost_url(url: str, vhost: str) -> str:
    """``url`` (``amqp://user:pass@host:port/...``) pointed at ``vhost`` ("" and "/" are the default one)."""
    base, _, query = url.partition("?")
    scheme, rest = base.split("://", 1)
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{quote(vhost or '/', safe='')}" + (f"?{query}" if query else "")


def queue_depth(channel: Any, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare on an open pika channel)."""
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def queue_depths(url: str, queues: Iterable[str]) -> dict[str, int]:
    """Messages ready per queue, over a connection of its own (``url``: one node, or several comma-separated)."""
    import pika

    from worker.rabbit.connection import connection_parameters

    conn = pika.BlockingConnection(connection_parameters(url, 60))
    try:
        ch = conn.channel()
        return {q: queue_depth(ch, q) for q in queues}
    finally:
        conn.close()


# -- the servers of a test run: local ones, or containers ----------------------------------

#: the servers the tests need, by the name ORDERS_TEST_SERVERS and the messages use
SERVERS = ("postgres", "rabbitmq", "redis")
SERVER_TITLES = {"postgres": "PostgreSQL", "rabbitmq": "RabbitMQ", "redis": "Redis"}
#: the images a run starts where a server does not answer (RabbitMQ: no management plugin)
IMAGES = {"postgres": "postgres:15", "rabbitmq": "rabbitmq:3.13", "redis": "redis:7"}
#: ORDERS_TEST_SERVERS: unset (or "auto") = the configured servers that answer, containers for the others
SERVER_MODES = ("local", "containers")
HOW_TO_RUN_SERVERS = (
    "start them (bash scripts/ensure_services.sh, or point ORDERS_DATABASE__HOST/PORT, ORDERS_RABBITMQ__URL, "
    "ORDERS_REDIS__HOST/PORT at servers that run)"
)
HOW_TO_RUN_DOCKER = "start a Docker daemon, and the tests run them in containers (testcontainers)"


@dataclass(frozen=True)
class ServerChoice:
    """Which servers a run uses as configured, which it starts in containers; or why it cannot run."""

    local: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()
    #: one line, set when the run cannot go on (it stops with it)
    error: str = ""


def _titles(names: Iterable[str], where: Mapping[str, str]) -> str:
    return ", ".join(f"{SERVER_TITLES[n]} ({where[n]})" if n in where else SERVER_TITLES[n] for n in names)


def choose_servers(
    mode: str | None,
    answers: Mapping[str, bool],
    docker_answers: Callable[[], bool],
    where: Mapping[str, str] | None = None,
) -> ServerChoice:
    """Where the run's servers come from.

    ``mode`` is ORDERS_TEST_SERVERS; ``answers`` says, per server, whether the configured one
    answers (``where``: its address, for the message); ``docker_answers`` is asked only when a
    container is wanted.  Local servers first: unset, each configured server that answers is
    used and the others are started in containers; ``local`` uses only configured servers,
    ``containers`` only containers.
    """
    where = where or {}
    mode = (mode or "").strip().lower() or "auto"
    if mode not in (*SERVER_MODES, "auto"):
        return ServerChoice(error=f"ORDERS_TEST_SERVERS={mode!r}: use local, containers, or leave it unset (auto)")
    missing = tuple(n for n in SERVERS if not answers.get(n, False))
    if mode == "local":
        if missing:
            return ServerChoice(
                error=f"ORDERS_TEST_SERVERS=local but {_titles(missing, where)} do not answer: "
                f"{HOW_TO_RUN_SERVERS}, or set ORDERS_TEST_SERVERS=containers where Docker runs"
            )
        return ServerChoice(local=SERVERS)
    if mode == "auto" and not missing:
        return ServerChoice(local=SERVERS)
    wanted = SERVERS if mode == "containers" else missing
    if not docker_answers():
        if mode == "containers":
            return ServerChoice(
                error="ORDERS_TEST_SERVERS=containers but no Docker daemon answers: start Docker, "
                f"or leave ORDERS_TEST_SERVERS unset and {HOW_TO_RUN_SERVERS}"
            )
        return ServerChoice(
            error=f"the tests need {_titles(missing, where)}, which do not answer, and no Docker daemon answers: "
            f"{HOW_TO_RUN_SERVERS}; or {HOW_TO_RUN_DOCKER}"
        )
    return ServerChoice(local=tuple(n for n in SERVERS if n not in wanted), containers=wanted)


def tcp_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts a TCP connection at ``host:port``."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def configured_servers(settings: Any) -> dict[str, tuple[str, int]]:
    """The address of each server the settings name."""
    from urllib.parse import urlsplit

    url = urlsplit(settings.rabbitmq.url.get_secret_value())
    return {
        "postgres": (settings.database.host, int(settings.database.port)),
        "rabbitmq": (url.hostname or "127.0.0.1", url.port or (5671 if url.scheme == "amqps" else 5672)),
        "redis": (settings.redis.host, int(settings.redis.port)),
    }


def docker_answers(timeout: float = 3.0) -> bool:
    """Whether a Docker daemon answers (DOCKER_HOST or the default socket), through the Docker SDK."""
    try:
        import docker  # testcontainers' dependency

        client = docker.from_env(timeout=int(timeout))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - no SDK, no socket, no daemon, refused: all say "no Docker"
        return False


class Containers:
    """Servers started in Docker for one test run (testcontainers), and the settings that point at them.

    Testcontainers' reaper (Ryuk) removes them when this process goes away
    without :meth:`stop` (a killed pytest).
    """

    def __init__(self) -> None:
        self.started: dict[str, Any] = {}
        self.env: dict[str, str] = {}

    def start(self, names: Iterable[str]) -> Containers:
        for name in names:
            getattr(self, f"_start_{name}")()
        return self

    def _start_postgres(self) -> None:
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers before 4.10
            from testcontainers.postgres import PostgresContainer

        c = PostgresContainer(IMAGES["postgres"], username="postgres", password="postgres", dbname="postgres")
        self.started["postgres"] = c.start()
        self.env.update(
            {
                "ORDERS_DATABASE__HOST": c.get_container_host_ip(),
                "ORDERS_DATABASE__PORT": str(c.get_exposed_port(5432)),
                "ORDERS_DATABASE__USER": "postgres",
                "ORDERS_DATABASE__PASSWORD": "postgres",
            }
        )

    def _start_rabbitmq(self) -> None:
        try:
            from testcontainers.community.rabbitmq import RabbitMqContainer
        except ImportError:
            from testcontainers.rabbitmq import RabbitMqContainer

        c = RabbitMqContainer(IMAGES["rabbitmq"], username="guest", password="guest")
        self.started["rabbitmq"] = c.start()
        host, port = c.get_container_host_ip(), c.get_exposed_port(5672)
        self.env["ORDERS_RABBITMQ__URL"] = f"amqp://guest:guest@{host}:{port}/"
        # vhosts are made inside the container (where docker's CLI is missing, runs fall back to "/",
        # which is the run's own here anyway)
        self.env["ORDERS_TEST_RABBITMQCTL"] = f"docker exec {c.get_wrapped_container().id} rabbitmqctl"

    def _start_redis(self) -> None:
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:
            from testcontainers.redis import RedisContainer

        c = RedisContainer(IMAGES["redis"])
        self.started["redis"] = c.start()
        self.env.update(
            {"ORDERS_REDIS__HOST": c.get_container_host_ip(), "ORDERS_REDIS__PORT": str(c.get_exposed_port(6379))}
        )

    def stop(self) -> None:
        for c in self.started.values():
            with contextlib.suppress(Exception):
                c.stop()
        self.started.clear()


def amqp_port(url: str) -> int:
    """The port of an ``amqp[s]://`` URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.port or (5671 if parts.scheme == "amqps" else 5672)


def with_amqp_port(url: str, port: int) -> str:
    """``url`` with its host and port set to 127.0.0.1:``port`` (a loopback proxy in front of the broker)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))
