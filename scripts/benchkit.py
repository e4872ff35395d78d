"""What the benchmarks share: CPU per order from ``/proc``, percentiles, medians.

CPU accounting (:class:`CpuMeter`): a snapshot reads ``utime + stime + cutime +
cstime`` of every process on the machine (``/proc/<pid>/stat``) and which
processes belong to each component at that moment; between two snapshots a
component used the sum, over its processes, of what each used in between (a
process that started in between counts whole; a child that exited and was
reaped counts in its parent's ``cutime``/``cstime``).  Divided by the orders
done in the same interval: µs of CPU per order, per component.

Components are found from ``/proc`` alone, so that the neighbours of a shared
machine are left out:

* a process tree: a pid and its descendants (the worker pool's supervisor and
  its children, the relay, a Dramatiq master and its workers, a fake);
* the server listening on a TCP port (the RabbitMQ node on the AMQP port, the
  PostgreSQL postmaster on 5432) and its descendants;
* PostgreSQL backends of one database (the process title ``postgres: [cluster:]
  user dbname host(port) state``), optionally only those whose client port
  belongs to given processes (the relay's connections), or all but those (the
  benchmark's own poller is left out of the service's share).

Nothing here imports the service, so the unit tests import it with no server
in sight (``ProcFS(root)`` reads a fake process table).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: clock ticks per second of /proc's CPU times
HZ = os.sysconf("SC_CLK_TCK")

#: a backend's process title: ``postgres: [cluster: ]user dbname host(port) state``
_BACKEND_TITLE = re.compile(r"^postgres: (?:\S+: )?(?P<user>\S+) (?P<db>\S+) (?:\[local\]|[^\s(]+\((?P<port>\d+)\)) ")
_TCP_LISTEN = "0A"


# -- the process table ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """One line of ``/proc/<pid>/stat``, the fields the accounting needs."""

    pid: int
    comm: str
    ppid: int
    #: start time in ticks since boot: with the pid, it names one process (pids are reused)
    start: int
    #: utime + stime
    own: int
    #: cutime + cstime: the children this process waited for
    reaped: int

    @property
    def ticks(self) -> int:
        return self.own + self.reaped


def parse_stat(text: str) -> ProcStat:
    """A ``/proc/<pid>/stat`` line (the command may hold spaces and parentheses)."""
    head, _, rest = text.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    f = rest.split()
    # f[0] is field 3 (state): ppid 4, utime 14, stime 15, cutime 16, cstime 17, starttime 22
    return ProcStat(
        pid=int(pid_s),
        comm=comm,
        ppid=int(f[1]),
        start=int(f[19]),
        own=int(f[11]) + int(f[12]),
        reaped=int(f[13]) + int(f[14]),
    )


class ProcFS:
    """Reads a process table: the machine's ``/proc``, or a fake one in tests."""

    def __init__(self, root: str | Path = "/proc") -> None:
        self.root = Path(root)

    def pids(self) -> list[int]:
        try:
            return [int(p.name) for p in self.root.iterdir() if p.name.isdigit()]
        except OSError:
            return []

    def stat(self, pid: int) -> ProcStat | None:
        try:
            return parse_stat((self.root / str(pid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            return None  # gone in between, or not ours to read

    def stats(self) -> dict[int, ProcStat]:
        out = {}
        for pid in self.pids():
            s = self.stat(pid)
            if s is not None:
                out[pid] = s
        return out

    def cmdline(self, pid: int) -> str:
        try:
            return (self.root / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def system_ticks(self) -> tuple[int, int]:
        """(all, idle) ticks of the machine from ``/proc/stat`` (idle includes iowait)."""
        try:
            vals = [int(v) for v in (self.root / "stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return 0, 0
        return sum(vals[:8]), vals[3] + vals[4]

    def rss_kib(self, pid: int) -> int:
        try:
            for line in (self.root / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return 0

    # sockets: which process listens on a port, which ports a process's connections use

    def tcp_sockets(self) -> list[tuple[int, str, int]]:
        """(local port, state, inode) of every TCP socket (IPv4 and IPv6) in ``net/tcp*``."""
        out = []
        for name in ("net/tcp", "net/tcp6"):
            try:
                lines = (self.root / name).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) < 10:
                    continue
                out.append((int(f[1].rsplit(":", 1)[1], 16), f[3], int(f[9])))
        return out

    def socket_inodes(self, pid: int) -> set[int]:
        found = set()
        fd_dir = self.root / str(pid) / "fd"
        try:
            entries = list(fd_dir.iterdir())
        except OSError:
            return found
        for fd in entries:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
        return found

    def listener(self, port: int, stats: Mapping[int, ProcStat] | None = None) -> int | None:
        """The pid holding a listening TCP socket on ``port`` (the oldest, when several share it)."""
        inodes = {inode for p, state, inode in self.tcp_sockets() if p == port and state == _TCP_LISTEN}
        if not inodes:
            return None
        stats = self.stats() if stats is None else stats
        owners = [pid for pid in stats if self.socket_inodes(pid) & inodes]
        return min(owners, key=lambda p: (stats[p].start, p)) if owners else None

    def local_ports(self, pids: Iterable[int]) -> set[int]:
        """Local ports of the TCP sockets these processes hold (their client connections' ports)."""
        inodes: set[int] = set()
        for pid in pids:
            inodes |= self.socket_inodes(pid)
        return {port for port, _, inode in self.tcp_sockets() if inode in inodes}


def descendants(root: int, stats: Mapping[int, ProcStat]) -> set[int]:
    """``root`` and every process below it (when ``root`` is alive)."""
    if root not in stats:
        return set()
    children: dict[int, list[int]] = {}
    for s in stats.values():
        children.setdefault(s.ppid, []).append(s.pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


@dataclass(frozen=True)
class Backend:
    pid: int
    user: str
    database: str
    client_port: int | None


def postgres_processes(proc: ProcFS, postmaster: int, stats: Mapping[int, ProcStat]) -> tuple[list[Backend], set[int]]:
    """The postmaster's client backends (from their titles) and its other processes (itself included)."""
    backends, server = [], {postmaster}
    for s in stats.values():
        if s.ppid != postmaster:
            continue
        m = _BACKEND_TITLE.match(proc.cmdline(s.pid))
        if m is None:
            server.add(s.pid)  # checkpointer, wal writer, background writer, launchers
        else:
            port = m.group("port")
            backends.append(Backend(s.pid, m.group("user"), m.group("db"), int(port) if port else None))
    return backends, server


# -- components ---------------------------------------------------------------------------


def tree(pid: Callable[[], int | None] | int | None) -> GroupFinder:
    """A process and its descendants (``pid`` may be a callable, read at each snapshot)."""

    def find(proc: ProcFS, stats: Mapping[int, ProcStat]) -> set[int]:
        root = pid() if callable(pid) else pid
        return descendants(root, stats) if root else set()

    return find


def trees(pids: Callable[[], Iterable[int]]) -> GroupFinder:
    """Several process trees as one component."""

    def find(proc: ProcFS, stats: Mapping[int, ProcStat]) -> set[int]:
        found: set[int] = set()
        for p in pids():
            found |= descendants(p, stats)
        return found

    return find


class Server:
    """The server listening on a TCP port (found once), e.g. the RabbitMQ node or the PostgreSQL postmaster."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._pid: int | None = None

    def pid(self, proc: ProcFS, stats: Mapping[int, ProcStat]) -> int | None:
        if self._pid is None or self._pid not in stats:
            found = proc.listener(self.port, stats)
            # a postmaster's backends also hold the listening socket (inherited): the root is the oldest holder
            self._pid = found
        return self._pid

    def whole(self) -> GroupFinder:
        """The server and every process below it."""

        def find(proc: ProcFS, stats: Mapping[int, ProcStat]) -> set[int]:
            root = self.pid(proc, stats)
            return descendants(root, stats) if root else set()

        return find

    def postgres_backends(
        self,
        database: str,
        only_clients: Callable[[], Iterable[int]] | None = None,
        not_clients: Callable[[], Iterable[int]] | None = None,
    ) -> GroupFinder:
        """Backends of ``database`` under this postmaster; only those serving connections of the
        ``only_clients`` processes, or all but those of the ``not_clients`` ones."""

        def find(proc: ProcFS, stats: Mapping[int, ProcStat]) -> set[int]:
            root = self.pid(proc, stats)
            if root is None:
                return set()
            backends, _ = postgres_processes(proc, root, stats)
            mine = [b for b in backends if b.database == database]
            if only_clients is not None:
                ports = proc.local_ports(only_clients())
                mine = [b for b in mine if b.client_port in ports]
            if not_clients is not None:
                ports = proc.local_ports(not_clients())
                mine = [b for b in mine if b.client_port not in ports]
            return {b.pid for b in mine}

        return find

    def postgres_server(self) -> GroupFinder:
        """The postmaster and its processes that serve no client (WAL writer, checkpointer, writers)."""

        def find(proc: ProcFS, stats: Mapping[int, ProcStat]) -> set[int]:
            root = self.pid(proc, stats)
            return postgres_processes(proc, root, stats)[1] if root else set()

        return find


# -- CPU per order ------------------------------------------------------------------------


@dataclass
class CpuSnapshot:
    t: float
    stats: dict[int, ProcStat]
    groups: dict[str, set[int]]
    system: tuple[int, int]
    #: groups whose processes count their own time only, not their reaped children's
    own_only: frozenset[str] = frozenset()


#: what a component is made of at one snapshot: (the process table, its stats) → pids
GroupFinder = Callable[[ProcFS, Mapping[int, ProcStat]], set[int]]


class CpuMeter:
    """Snapshots of the CPU time of named groups of processes (see the module docstring)."""

    def __init__(
        self, groups: Mapping[str, GroupFinder], proc: ProcFS | None = None, own_only: Iterable[str] = ()
    ) -> None:
        """``own_only``: groups whose processes reap others' children (a postmaster reaps the backends of
        every database on the server): only their own time counts."""
        self.groups = dict(groups)
        self.proc = proc or ProcFS()
        self.own_only = frozenset(own_only)

    def snapshot(self) -> CpuSnapshot:
        stats = self.proc.stats()
        groups = {}
        for name, find in self.groups.items():
            try:
                groups[name] = set(find(self.proc, stats))
            except Exception:  # noqa: BLE001 - a component that cannot be found counts nothing, never fails a run
                groups[name] = set()
        return CpuSnapshot(time.monotonic(), stats, groups, self.proc.system_ticks(), self.own_only)


def group_ticks(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, int]:
    """Ticks each group used between ``a`` and ``b`` (its members at either snapshot)."""
    out = {}
    for name in b.groups.keys() | a.groups.keys():
        total = 0
        own_only = name in b.own_only
        for pid in b.groups.get(name, set()) | a.groups.get(name, set()):
            after = b.stats.get(pid)
            if after is None:
                continue  # exited in between: what it used after ``a`` is lost unless a counted parent reaped it
            before = a.stats.get(pid)
            used = (lambda s: s.own) if own_only else (lambda s: s.ticks)
            if before is not None and before.start == after.start:
                total += max(0, used(after) - used(before))
            else:
                total += used(after)  # started in between: all of its time is in the interval
        out[name] = total
    return out


@dataclass
class CpuCost:
    """CPU of each component over an interval, per order done in it."""

    seconds: float
    orders: int
    #: µs of CPU per order, by component (and "total", the sum of ``total_of``)
    us_per_order: dict[str, float]
    #: percent of one core over the interval (200 = two cores busy), by component
    percent: dict[str, float]
    #: the whole machine, percent of one core; "other" is what no component accounts for (the neighbours)
    machine_percent: float
    other_us_per_order: float
    total_of: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "orders": self.orders,
            "us_per_order": {k: round(v, 1) for k, v in self.us_per_order.items()},
            "percent": {k: round(v, 1) for k, v in self.percent.items()},
            "machine_percent": round(self.machine_percent, 1),
            "other_us_per_order": round(self.other_us_per_order, 1),
            "total_of": list(self.total_of),
        }


def cpu_cost(
    a: CpuSnapshot,
    b: CpuSnapshot,
    orders: int,
    total_of: Sequence[str],
    cpus: int | None = None,
    hz: int = HZ,
) -> CpuCost:
    """µs per order and percent of a core for each group between two snapshots; "total" sums ``total_of``."""
    ticks = group_ticks(a, b)
    seconds = max(1e-9, b.t - a.t)
    n = max(1, orders)
    us = {k: v / hz * 1e6 / n for k, v in ticks.items()}
    us["total"] = sum(us.get(k, 0.0) for k in total_of)
    pct = {k: 100.0 * v / hz / seconds for k, v in ticks.items()}
    pct["total"] = sum(pct.get(k, 0.0) for k in total_of)
    all_ticks, idle = b.system[0] - a.system[0], b.system[1] - a.system[1]
    cores = cpus or os.cpu_count() or 1
    machine = 100.0 * cores * (all_ticks - idle) / all_ticks if all_ticks > 0 else 0.0
    accounted = sum(ticks.values())
    busy_ticks = machine / 100.0 * seconds * hz
    other = max(0.0, busy_ticks - accounted) / hz * 1e6 / n
    return CpuCost(seconds, orders, us, pct, machine, other, tuple(total_of))


def median_costs(costs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per key, the median over rounds (keys missing from a round are left out of that key's median)."""
    keys: list[str] = []
    for c in costs:
        keys.extend(k for k in c if k not in keys)
    return {k: statistics.median([c[k] for c in costs if k in c]) for k in keys}


# -- percentiles and medians ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks (numpy's default).

    NaN for no values.
    """
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Count, p50, p90, p99, p99.9 and max of latencies given in seconds, in milliseconds."""
    if not seconds:
        return {"count": 0, "p50_ms": math.nan, "p90_ms": math.nan, "p99_ms": math.nan, "p999_ms": math.nan}
    data = sorted(seconds)
    return {
        "count": len(data),
        "p50_ms": percentile(data, 50) * 1000,
        "p90_ms": percentile(data, 90) * 1000,
        "p99_ms": percentile(data, 99) * 1000,
        "p999_ms": percentile(data, 99.9) * 1000,
        "max_ms": data[-1] * 1000,
    }


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two distinct x)."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def fmt(v: Any, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{unit}"


def machine_line() -> str:
    """``nproc``, the CPU model and the load average now (for the figures' record)."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs ({model}), load average {load}"


_LOCKING = re.compile(
    r"\s+FOR\s+(?:NO\s+KEY\s+UPDATE|UPDATE|KEY\s+SHARE|SHARE)(?:\s+OF\s+[\w\s,.\"]+?)?(?:\s+SKIP\s+LOCKED|\s+NOWAIT)?"
    r"(?=\s*(?:;|$|\)))",
    re.IGNORECASE,
)


def without_locking(sql: str) -> str:
    """``sql`` without its row-locking clause (``FOR UPDATE SKIP LOCKED`` and the like)."""
    return _LOCKING.sub("", sql.strip()).rstrip(";").strip()
