"""The injections: the seeded schedule of worker and relay SIGKILLs, of RabbitMQ, PostgreSQL and
Redis outages and, on a broker of the run's own, a RabbitMQ disk alarm (:class:`Injector`), carried out
while the load runs.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass

from .config import ChaosConfig, say
from .processes import POOL_CHILDREN, process_age
from .stack import Stack

#: the supervisor counts a child dying sooner than this after its start as a crash loop
MIN_CHILD_AGE = 6.0
#: seconds between the end of one injection and the start of the next, at least
MIN_GAP = 2.0
#: the injections that take a dependency away
OUTAGES = ("rabbitmq restart", "postgresql restart", "redis stop")
#: on a cluster: the node leading orders.place stopped (and started later), then another node, the
#: PostgreSQL primary stopped with -m immediate and its standby promoted, and Redis as on one box
CLUSTER_OUTAGES = ("rabbitmq leader stop", "rabbitmq node stop", "postgresql failover", "redis stop")
#: a disk alarm on the run's own broker (``--private-rabbit`` or a cluster; never the machine's shared node):
#: RabbitMQ blocks every publishing connection until it is lifted
ALARM = "rabbitmq alarm"
#: the queue whose leader is stopped first
LEADER_QUEUE = "orders.place"


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
        #: when (monotonic) Redis came back, empty, from its outage; None: it never went away
        self.redis_back_at: float | None = None
        rnd = random.Random(f"injections-{cfg.seed}")
        outages = CLUSTER_OUTAGES if cfg.topology == "cluster" else OUTAGES
        if cfg.alarms:
            outages = (*outages, ALARM)
        self.outages = outages
        kinds = ["worker kill"] * cfg.worker_kills + ["relay kill"] * cfg.relay_kills + list(outages)
        rnd.shuffle(kinds)
        # outages only in the first 70 % of the schedule: load still follows each of them, so the run sees
        # the recovery under load, and views are written to the Redis that came back empty (check 12)
        late = len(kinds) * 7 // 10
        for i in range(late, len(kinds)):
            if kinds[i] in outages:
                j = next((j for j in range(late) if kinds[j] not in outages), None)
                if j is not None:
                    kinds[i], kinds[j] = kinds[j], kinds[i]
        # the leader goes first, another node after it
        at = [i for i, k in enumerate(kinds) if k in ("rabbitmq leader stop", "rabbitmq node stop")]
        for i, kind in zip(at, ("rabbitmq leader stop", "rabbitmq node stop")):
            kinds[i] = kind
        span = cfg.window * 0.9
        slot = span / max(1, len(kinds))
        self.schedule = [
            Injection(kind, cfg.window * 0.05 + i * slot + rnd.uniform(0, slot * 0.5)) for i, kind in enumerate(kinds)
        ]
        self.rnd = rnd
        self.done = threading.Event()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.killed_workers: list[int] = []
        self.takeovers: list[float] = []
        self.stopped_nodes: list[int] = []
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
            kids = [p for p in pool.children(POOL_CHILDREN) if process_age(p) >= MIN_CHILD_AGE]
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

    def _outage(self, inj: Injection, dependency: str, seconds: float, what: str) -> None:
        started = time.monotonic()
        self.stack.down(dependency)
        if not self.cfg.real_restarts or what == "redis":
            time.sleep(seconds)
        self.stack.up(dependency)
        if what == "redis":
            self.redis_back_at = time.monotonic()
        inj.detail = f"{what} away for {time.monotonic() - started:.1f}s" + (
            " (machine's server restarted)"
            if self.cfg.real_restarts
            else " (proxy cut)"
            if what != "redis"
            else " (private redis-server killed, started again empty)"
        )

    def _rabbitmq_restart(self, inj: Injection) -> None:
        self._outage(inj, "rabbitmq", self.cfg.rabbit_outage_s, "rabbitmq")

    def _postgres_restart(self, inj: Injection) -> None:
        self._outage(inj, "postgres", self.cfg.postgres_outage_s, "postgresql")

    def _redis_stop(self, inj: Injection) -> None:
        self._outage(inj, "redis", self.cfg.redis_outage_s, "redis")

    def _rabbitmq_alarm(self, inj: Injection) -> None:
        started = time.monotonic()
        node = self.stack.alarm(True)
        try:
            time.sleep(self.cfg.alarm_s)
        finally:
            self.stack.alarm(False)
        inj.detail = (
            f"disk alarm on {node} for {time.monotonic() - started:.1f}s "
            "(set_disk_free_limit 1000000GB, then 50MB): publishers blocked meanwhile"
        )

    # -- a cluster's nodes, one at a time ------------------------------------------------

    def _rabbit_node_away(self, inj: Injection, n: int, why: str) -> None:
        cluster = self.stack.cluster
        assert cluster is not None
        started = time.monotonic()
        cluster.rabbit_stop(n)
        self.stopped_nodes.append(n)
        time.sleep(self.cfg.rabbit_outage_s)
        cluster.rabbit_start(n)
        inj.detail = (
            f"node {cluster.nodes[n - 1]} ({why}) stopped, started again after {time.monotonic() - started:.1f}s"
        )

    def _rabbitmq_leader_stop(self, inj: Injection) -> None:
        cluster = self.stack.cluster
        assert cluster is not None
        leader = cluster.leader(LEADER_QUEUE, self.cfg.vhost)
        self._rabbit_node_away(inj, leader, f"leader of {LEADER_QUEUE}")
        after = cluster.leader(LEADER_QUEUE, self.cfg.vhost)
        inj.detail += f"; leader now {cluster.nodes[after - 1]}"

    def _rabbitmq_node_stop(self, inj: Injection) -> None:
        cluster = self.stack.cluster
        assert cluster is not None
        leader = cluster.leader(LEADER_QUEUE, self.cfg.vhost)
        others = [n for n in range(1, len(cluster.nodes) + 1) if n != leader and n not in self.stopped_nodes]
        n = self.rnd.choice(others or [n for n in range(1, len(cluster.nodes) + 1) if n != leader])
        self._rabbit_node_away(inj, n, "another node")

    def _postgres_failover(self, inj: Injection) -> None:
        cluster = self.stack.cluster
        assert cluster is not None
        inj.detail = cluster.failover() + " (old primary stopped -m immediate, standby promoted)"
