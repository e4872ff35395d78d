"""``scripts/cluster.sh``: the cluster on one machine comes up, its printed settings
connect (three RabbitMQ nodes, a write through the multi-host DSN, also after a
failover), and ``down`` leaves nothing behind.

The cluster here has names, ports and a directory of its own (by pid), so the
cluster a chaos run may have up with the defaults is never touched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import psycopg2
import pytest

from scripts.harness import cluster_settings
from tests.support import wait_until

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster.sh"
#: seconds one `cluster.sh` call may take (`up` boots three RabbitMQ nodes and two PostgreSQL clusters)
SCRIPT_TIMEOUT = 240
RABBITMQCTL = "/usr/sbin/rabbitmqctl"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "scripts/cluster.sh runs the nodes as the rabbitmq and postgres users: needs root"
    if not (shutil.which("rabbitmq-server") or Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()):
        return "rabbitmq-server is not installed (Debian package rabbitmq-server)"
    if not shutil.which("pg_createcluster"):
        return "pg_createcluster is not installed (Debian packages postgresql-common, postgresql-15)"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
]


def _free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _free_base() -> int:
    """A port base where the 3 AMQP (base+0..2), 3 distribution (base+10..12) and 2 PostgreSQL (base+20, 21) ports are free."""
    for _ in range(50):
        base = random.randrange(20000, 29000, 100)
        if all(_free(base + offset) for offset in (0, 1, 2, 10, 11, 12, 20, 21)):
            return base
    raise AssertionError("no free port range for the test cluster")


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"cluster.sh {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


def dsn_of(settings: dict[str, str], **override: str) -> str:
    """A libpq DSN built from the ORDERS_DATABASE__* settings."""
    keys = {
        "host": settings["ORDERS_DATABASE__HOST"],
        "port": settings["ORDERS_DATABASE__PORT"],
        "user": settings["ORDERS_DATABASE__USER"],
        "password": settings["ORDERS_DATABASE__PASSWORD"],
        "dbname": settings["ORDERS_DATABASE__DBNAME"],
        "target_session_attrs": settings["ORDERS_DATABASE__TARGET_SESSION_ATTRS"],
        "connect_timeout": "5",
        **override,
    }
    return " ".join(f"{key}={value}" for key, value in keys.items())


def rabbitmqctl_json(node: str, *args: str) -> Any:
    done = subprocess.run(
        [RABBITMQCTL, "-n", node, "-q", *args, "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """A cluster of this module's own, up; torn down at the end whatever happened."""
    tag = f"t{os.getpid()}"
    base = _free_base()
    env = {
        **os.environ,
        "CLUSTER_DIR": f"/tmp/orders-cluster-{tag}",
        "CLUSTER_RABBIT_PREFIX": f"{tag}c",
        "CLUSTER_RABBIT_PORT": str(base),
        "CLUSTER_RABBIT_DIST_PORT": str(base + 10),
        "CLUSTER_PG_PREFIX": f"orders_{tag}",
        "CLUSTER_PG_PORT": str(base + 20),
    }
    try:
        up = run(env, "up")
        yield {
            "env": env,
            "settings": cluster_settings(up.stdout),
            "nodes": [f"{tag}c{n}@localhost" for n in (1, 2, 3)],
            "pg": [f"orders_{tag}_a", f"orders_{tag}_b"],
            "pg_ports": [base + 20, base + 21],
        }
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=SCRIPT_TIMEOUT, check=False)


def test_up_prints_amqp_urls_of_three_clustered_nodes_and_a_quorum_queue_gets_three_members(cluster):
    urls = cluster["settings"]["ORDERS_RABBITMQ__URL"].split(",")
    assert len(urls) == 3
    status = rabbitmqctl_json(cluster["nodes"][0], "cluster_status")
    assert sorted(status["running_nodes"]) == sorted(cluster["nodes"])

    for url in urls:  # each URL reaches a node of the cluster with the printed user
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.queue_declare("cluster.probe", durable=True, arguments={"x-queue-type": "quorum"})
        connection.close()

    queues = {q["name"]: q for q in rabbitmqctl_json(cluster["nodes"][1], "list_queues", "name", "type", "members")}
    assert queues["cluster.probe"]["type"] == "quorum"
    assert sorted(queues["cluster.probe"]["members"]) == sorted(cluster["nodes"])
    leader = run(cluster["env"], "leader", "cluster.probe").stdout.strip()
    assert leader in cluster["nodes"]


def test_up_again_keeps_the_settings_and_status_shows_the_primary_and_its_sync_standby(cluster):
    again = run(cluster["env"], "up")
    assert cluster_settings(again.stdout) == cluster["settings"], "a second up must not change ports or passwords"

    status = run(cluster["env"], "status").stdout
    a, b = cluster["pg"]
    assert f"{a} " in status and f"{b} " in status
    pg_lines = {name: line for line in status.splitlines() for name in (a, b) if f"/{name} " in line}
    assert pg_lines[a].endswith("online primary"), status
    assert pg_lines[b].endswith("online standby"), status
    assert f"{b} streaming sync_state=sync" in status
    assert "running nodes: " + " ".join(sorted(cluster["nodes"])) in status
    assert cluster_settings(status) == cluster["settings"]


def test_multi_host_dsn_writes_on_the_primary_and_after_failover_on_the_promoted_standby(cluster):
    settings = cluster["settings"]
    port_a, port_b = cluster["pg_ports"]
    with psycopg2.connect(dsn_of(settings)) as conn, conn.cursor() as cur:
        cur.execute("SELECT inet_server_port(), pg_is_in_recovery()")
        assert cur.fetchone() == (port_a, False)
        cur.execute("CREATE TABLE IF NOT EXISTS acked (id int PRIMARY KEY)")
        cur.execute("INSERT INTO acked VALUES (1)")
    conn.close()

    # a synchronous commit: the standby has the row once the commit returned
    standby = dsn_of(settings, host="127.0.0.1", port=str(port_b), target_session_attrs="any")

    def standby_rows() -> list[tuple[int]]:
        with psycopg2.connect(standby) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('acked') IS NOT NULL")
            if not cur.fetchone()[0]:
                return []
            cur.execute("SELECT id FROM acked")
            return cur.fetchall()

    assert wait_until(standby_rows, timeout=10, what="the row on the standby") == [(1,)]

    failover = run(cluster["env"], "failover").stdout
    assert f"primary: 15/{cluster['pg'][1]}" in failover

    with psycopg2.connect(dsn_of(settings)) as conn, conn.cursor() as cur:
        cur.execute("SELECT inet_server_port(), pg_is_in_recovery()")
        assert cur.fetchone() == (port_b, False), "target_session_attrs=read-write must land on the new primary"
        cur.execute("INSERT INTO acked VALUES (2)")
        cur.execute("SELECT id FROM acked ORDER BY id")
        assert cur.fetchall() == [(1,), (2,)], "the write acked before the failover must survive it"
    conn.close()


def test_a_short_chaos_run_on_the_cluster_loses_nothing_through_node_stops_and_a_failover(cluster, monkeypatch):
    """The chaos run's invariants while the node leading orders.place stops, then another, and the
    PostgreSQL primary is failed over; the service is never restarted (``python -m scripts.chaos
    --topology cluster`` is the long version, on the default cluster)."""
    from scripts import chaos

    for key, value in cluster["env"].items():
        if key.startswith("CLUSTER_"):
            monkeypatch.setenv(key, value)
    run_id = os.environ.get("ORDERS_TEST_RUN_ID", str(os.getpid()))
    cfg = chaos.ChaosConfig.short(
        topology="cluster",
        orders=600,
        rate=6.0,
        min_window=90.0,
        worker_kills=2,
        relay_kills=1,
        malformed=30,
        seed=int(os.environ.get("CHAOS_SEED", "5")),
        database=f"orders_chaos_cluster_{run_id}",
        vhost=f"orders-chaos-cluster-{run_id}",
        drop_after=True,
    )

    result = chaos.run(cfg)

    failed = {c["name"]: c["problems"][:5] for c in result["checks"] if not c["ok"]}
    assert not failed, f"chaos checks violated (logs: {result['logs']}): {failed}"
    injected = {row[0]: int(row[2]) for row in result["injected"] if row[2].isdigit()}
    assert injected["RabbitMQ leader of orders.place stopped"] == 1
    assert injected["RabbitMQ other node stopped"] == 1
    assert injected["PostgreSQL failover"] == 1
    assert injected["orders placed"] == cfg.orders
    assert result["statuses"].get("completed", 0) > cfg.orders // 2


def test_down_stops_and_removes_everything_up_made(cluster):
    run(cluster["env"], "down")

    clusters = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True).stdout
    assert not any(name in clusters for name in cluster["pg"]), clusters
    assert not any(Path("/etc/postgresql/15", name).exists() for name in cluster["pg"])
    names = subprocess.run(["epmd", "-names"], capture_output=True, text=True, check=False).stdout
    assert not any(node.split("@")[0] in names for node in cluster["nodes"]), names
    cluster_dir = cluster["env"]["CLUSTER_DIR"]
    assert not Path(cluster_dir).exists()
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cluster_dir.encode() in cmdline.read_bytes():
                leftovers.append(cmdline.parent.name)
        except OSError:
            continue
    assert not leftovers, f"processes still running from {cluster_dir}: {leftovers}"
    for port in cluster["pg_ports"]:
        assert _free(port)
