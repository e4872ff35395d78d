"""The benchmarks' accounting (scripts/benchkit.py): CPU per order per component over a fake
process table, the server and backend lookups, and the percentile maths."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from scripts import benchkit
from scripts.benchkit import CpuMeter, ProcFS, Server


class FakeProc:
    """A fake ``/proc``: processes with stat lines, command lines and sockets; the machine's ticks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tcp: list[tuple[int, str, int]] = []  # (local port, state, inode)
        root.mkdir(exist_ok=True)
        self.machine(0, 0)

    def add(
        self,
        pid: int,
        ppid: int,
        own: int,
        reaped: int = 0,
        start: int = 100,
        comm: str = "python3",
        cmdline: str = "",
        sockets: tuple[int, ...] = (),
    ) -> None:
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True, exist_ok=True)
        utime, stime = own - own // 3, own // 3
        cutime, cstime = reaped - reaped // 2, reaped // 2
        # fields 3.. : state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        #              utime stime cutime cstime priority nice threads itrealvalue starttime ...
        rest = f"S {ppid} {pid} {pid} 0 -1 0 0 0 0 0 {utime} {stime} {cutime} {cstime} 20 0 1 0 {start} 0 0"
        (d / "stat").write_text(f"{pid} ({comm}) {rest}\n")
        (d / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
        for fd in list((d / "fd").iterdir()):
            fd.unlink()
        for i, inode in enumerate(sockets):
            os.symlink(f"socket:[{inode}]", d / "fd" / str(i + 3))

    def remove(self, pid: int) -> None:
        d = self.root / str(pid)
        for fd in (d / "fd").iterdir():
            fd.unlink()
        (d / "fd").rmdir()
        for f in d.iterdir():
            f.unlink()
        d.rmdir()

    def machine(self, all_ticks: int, idle: int) -> None:
        busy = all_ticks - idle
        (self.root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")

    def socket(self, port: int, inode: int, listen: bool = False) -> None:
        self.tcp.append((port, "0A" if listen else "01", inode))
        lines = ["  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"]
        for i, (p, state, ino) in enumerate(self.tcp):
            lines.append(
                f"   {i}: 0100007F:{p:04X} 0100007F:1628 {state} 00000000:00000000 00:00000000 00000000  0 0 {ino} 1"
            )
        (self.root / "net").mkdir(exist_ok=True)
        (self.root / "net" / "tcp").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_parse_stat_reads_a_command_with_spaces_and_parentheses() -> None:
    line = "4242 (orders: worker (2)) S 17 4242 4242 0 -1 0 0 0 0 0 150 50 7 3 20 0 9 0 98765 0 0\n"
    s = benchkit.parse_stat(line)
    assert (s.pid, s.comm, s.ppid, s.own, s.reaped, s.start) == (4242, "orders: worker (2)", 17, 200, 10, 98765)


def test_cpu_per_order_counts_each_component_between_two_snapshots(fake: FakeProc) -> None:
    # a pool: supervisor 10 with two children; a relay 20; a neighbour 99 that belongs to nobody
    fake.add(10, 1, own=100)
    fake.add(11, 10, own=1000)
    fake.add(12, 10, own=2000)
    fake.add(20, 1, own=500)
    fake.add(99, 1, own=7000)
    fake.machine(all_ticks=10_000, idle=5_000)
    meter = CpuMeter({"workers": benchkit.tree(10), "relay": benchkit.tree(lambda: 20)}, proc=ProcFS(fake.root))
    a = meter.snapshot()
    # 2 s later: the children used 60 and 40 ticks, a third child started and used 30 (all of it in
    # the interval), the relay 20, the neighbour 300; the machine was busy 400 ticks of 400
    fake.add(11, 10, own=1060)
    fake.add(12, 10, own=2040)
    fake.add(13, 10, own=30, start=500)
    fake.add(20, 1, own=520)
    fake.add(99, 1, own=7300)
    fake.machine(all_ticks=10_400, idle=5_000)
    b = meter.snapshot()
    b.t = a.t + 2.0
    cost = benchkit.cpu_cost(a, b, orders=1000, total_of=("workers", "relay"), cpus=2, hz=100)
    # workers: 130 ticks = 1.3 s for 1000 orders = 1300 µs; relay 0.2 s = 200 µs
    assert cost.us_per_order["workers"] == pytest.approx(1300)
    assert cost.us_per_order["relay"] == pytest.approx(200)
    assert cost.us_per_order["total"] == pytest.approx(1500)
    assert cost.percent["workers"] == pytest.approx(65)  # 1.3 s of CPU in 2 s
    assert cost.machine_percent == pytest.approx(200)
    # the machine's 4 s of CPU less the 1.5 s accounted for: the neighbour's 3 s (+ rounding) per order
    assert cost.other_us_per_order == pytest.approx(2500)


def test_a_reused_pid_counts_as_a_new_process_and_a_reaped_child_through_its_parent(fake: FakeProc) -> None:
    fake.add(10, 1, own=100)
    fake.add(11, 10, own=5000, start=200)
    meter = CpuMeter({"pool": benchkit.tree(10)}, proc=ProcFS(fake.root))
    a = meter.snapshot()
    # child 11 exits (its 5,080 ticks reaped into the parent's cutime/cstime: 80 of them in the
    # interval, but the parent's share cannot tell: the whole 5,080 counts) and pid 11 is reused
    fake.remove(11)
    fake.add(10, 1, own=110, reaped=5080)
    fake.add(11, 10, own=25, start=900)
    b = meter.snapshot()
    ticks = benchkit.group_ticks(a, b)
    assert ticks["pool"] == 10 + 5080 + 25


def test_backends_of_one_database_split_by_the_clients_they_serve(fake: FakeProc) -> None:
    # postmaster 50 listening on 5432; backends of orders_bench for the relay (client port 40001)
    # and for the benchmark's poller (40002); another database's backend; the WAL writer
    fake.socket(5432, inode=7000, listen=True)
    fake.socket(40001, inode=7101)
    fake.socket(40002, inode=7102)
    fake.add(50, 1, own=10, comm="postgres", cmdline="/usr/lib/postgresql/15/bin/postgres -D x", sockets=(7000,))
    fake.add(51, 50, own=1, comm="postgres", cmdline="postgres: 15/main: logical replication launcher ")
    fake.add(52, 50, own=1, comm="postgres", cmdline="postgres: 15/main: postgres orders_bench 127.0.0.1(40001) idle")
    fake.add(53, 50, own=1, comm="postgres", cmdline="postgres: 15/main: postgres orders_bench 127.0.0.1(40002) idle")
    fake.add(54, 50, own=1, comm="postgres", cmdline="postgres: postgres other_db 127.0.0.1(40003) idle")
    fake.add(60, 1, own=1, comm="orders", sockets=(7101,))  # the relay
    fake.add(70, 1, own=1, comm="python3", sockets=(7102,))  # the benchmark
    proc, stats = ProcFS(fake.root), ProcFS(fake.root).stats()
    pg = Server(5432)
    assert pg.pid(proc, stats) == 50
    assert pg.postgres_backends("orders_bench")(proc, stats) == {52, 53}
    assert pg.postgres_backends("orders_bench", only_clients=lambda: [60])(proc, stats) == {52}
    assert pg.postgres_backends("orders_bench", not_clients=lambda: [70])(proc, stats) == {52}
    assert pg.postgres_server()(proc, stats) == {50, 51}


def test_the_server_on_a_port_is_its_oldest_holder_and_its_children(fake: FakeProc) -> None:
    fake.socket(5672, inode=8000, listen=True)
    fake.add(80, 1, own=1, start=10, comm="beam.smp", sockets=(8000,))
    fake.add(81, 80, own=1, start=20, comm="erl_child_setup")
    fake.add(90, 1, own=1, start=30, comm="beam.smp")  # another node: not ours
    proc = ProcFS(fake.root)
    assert Server(5672).whole()(proc, proc.stats()) == {80, 81}
    assert Server(5999).whole()(proc, proc.stats()) == set()


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    data = [15, 20, 35, 40, 50]
    assert benchkit.percentile(data, 0) == 15
    assert benchkit.percentile(data, 100) == 50
    assert benchkit.percentile(data, 50) == 35
    assert benchkit.percentile(data, 40) == pytest.approx(29.0)  # numpy.percentile(data, 40)
    assert benchkit.percentile(list(reversed(data)), 90) == pytest.approx(46.0)
    assert math.isnan(benchkit.percentile([], 50))
    with pytest.raises(ValueError):
        benchkit.percentile(data, 101)


def test_latency_summary_in_milliseconds() -> None:
    summary = benchkit.latency_summary([i / 1000 for i in range(1, 1001)])  # 1 .. 1000 ms
    assert summary["count"] == 1000
    assert summary["p50_ms"] == pytest.approx(500.5)
    assert summary["p99_ms"] == pytest.approx(990.01)
    assert summary["max_ms"] == pytest.approx(1000)


def test_median_costs_and_slope() -> None:
    assert benchkit.median_costs([{"a": 1, "b": 10}, {"a": 3}, {"a": 2, "b": 20}]) == {"a": 2, "b": 15}
    assert benchkit.slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2)
    assert benchkit.slope([(1, 1)]) == 0
    assert benchkit.ratio(3, 0) is None and benchkit.ratio(3, 2) == 1.5


def test_an_own_only_group_leaves_out_what_its_processes_reaped(fake: FakeProc) -> None:
    # the postmaster reaps the backends of every database: their time is not the server's own
    fake.add(50, 1, own=100, reaped=0)
    meter = CpuMeter({"server": benchkit.tree(50)}, proc=ProcFS(fake.root), own_only=("server",))
    a = meter.snapshot()
    fake.add(50, 1, own=103, reaped=9000)
    assert benchkit.group_ticks(a, meter.snapshot()) == {"server": 3}


def test_the_soak_times_the_relay_poll_without_its_locking_clause() -> None:
    poll = "SELECT id, body FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED"
    assert (
        benchkit.without_locking(poll)
        == "SELECT id, body FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1000"
    )
    assert benchkit.without_locking("SELECT 1 FROM outbox WHERE id > 5 FOR NO KEY UPDATE NOWAIT;") == (
        "SELECT 1 FROM outbox WHERE id > 5"
    )
    assert benchkit.without_locking("SELECT * FROM outbox o FOR UPDATE OF o") == "SELECT * FROM outbox o"
    # a column or a string that merely says "for update" stays
    assert benchkit.without_locking("SELECT 'for update' AS x FROM outbox") == "SELECT 'for update' AS x FROM outbox"
