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
each and stops Redis for a while; on a broker of its own (``--private-rabbit``,
or a cluster) it raises a disk alarm too.  By default the service reaches RabbitMQ and
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

    .venv/bin/python -m scripts.chaos --seed 7 --orders 10000
    .venv/bin/python -m scripts.chaos --seed 7 --orders 2000 --json
    .venv/bin/python -m scripts.chaos --seed 7 --orders 5000 --topology cluster   # needs root: scripts/cluster.sh
    .venv/bin/python -m scripts.chaos --seed 7 --orders 2000 --private-rabbit     # needs root: own node, disk alarm
    sudo -E .venv/bin/python -m scripts.chaos --seed 7 --real-restarts   # restarts the machine's servers

(from the repository's root).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .checks import run_checks
from .config import ChaosConfig, ChaosError, say
from .driver import Buyer, Clerk, Driver, Ledger
from .injector import Injector
from .observe import snapshot, wait_for_quiescence
from .plan import load_products, plan_malformed, plan_orders
from .processes import proxy_main
from .report import injected_rows, render, repeats
from .stack import Stack


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
    driver = buyer = clerk = injector = None
    keep = cfg.keep_logs
    try:
        say(
            f"seed {cfg.seed}: {cfg.orders} orders over {cfg.window:.0f}s, database {cfg.database}, "
            f"vhost {cfg.vhost}, logs in {tmp}"
        )
        plan = plan_orders(cfg, load_products())
        malformed = plan_malformed(cfg, plan)
        stack.prepare()
        stack.start_service()
        faults = stack.faults_on(cfg.seed)
        ledger = Ledger()
        driver = Driver(cfg, stack, plan, malformed, ledger, deadline)
        buyer = Buyer(cfg, stack, {o.order_id: o for o in plan}, ledger, deadline)
        clerk = Clerk(cfg, stack, {o.order_id: o for o in plan}, ledger, deadline)
        injector = Injector(cfg, stack)
        say("service ready; load and injections start")
        buyer.start()
        clerk.start()
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
        quiet = wait_for_quiescence(
            stack, ledger, buyer, min(cfg.quiesce_timeout, max(10, deadline - time.monotonic())), clerk
        )
        buyer.stop()
        clerk.stop()
        if buyer.error is not None:
            raise ChaosError(f"the buyer simulation failed: {buyer.error!r}")
        if clerk.error is not None:
            raise ChaosError(f"the clerk simulation failed: {clerk.error!r}")
        say(f"quiescent after {quiet['seconds']:.0f}s; checking")
        snap = snapshot(stack)
        outcomes = Counter(r["status"] for r in snap.orders.values())
        checks = run_checks(snap, plan, malformed, ledger, stack, injector, outcomes)
        ok = all(c.ok for c in checks)
        keep = keep or not ok
        return {
            "ok": ok,
            "seed": cfg.seed,
            "orders": cfg.orders,
            "real_restarts": cfg.real_restarts,
            "topology": cfg.topology,
            "runtime_s": time.monotonic() - started,
            "load_s": load_s,
            "quiescence_s": quiet["seconds"],
            "logs": str(tmp) if keep else "(removed)",
            "injected": injected_rows(cfg, injector, ledger, buyer, faults, snap, plan, malformed),
            "checks": [asdict(c) for c in checks],
            "statuses": dict(outcomes),
            "events_captured": len(snap.events),
            "repeats": repeats(snap),
            "private_rabbit": stack.rabbit is not None,
            "dead_letters": len(snap.dead_letters),
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
        if clerk is not None and clerk.thread.is_alive():
            clerk.stop()
        stack.stop()
        failed = keep and not cfg.keep_logs
        if cfg.drop_after and not failed:
            stack.drop()  # through the cluster's rabbitmqctl on a cluster run
        stack.restore_rabbitmqctl()
        stack.remove_cluster()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(
                f"logs kept in {tmp}"
                + (f"; database {cfg.database} and vhost {cfg.vhost} kept too" if failed and cfg.drop_after else "")
            )
        lock_file.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m scripts.chaos``: returns the exit code.  ``_proxy`` is the child that
    :class:`~scripts.chaos.processes.ProxyProcess` starts."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_proxy"]:
        return proxy_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m scripts.chaos",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Usage::")[1],
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the load mix and the injection schedule (default 1)")
    ap.add_argument("--orders", type=int, default=10_000, help="orders to place (default 10000)")
    ap.add_argument(
        "--real-restarts",
        action="store_true",
        help="restart the machine's RabbitMQ, PostgreSQL and Redis (default: cut proxies, private Redis)",
    )
    ap.add_argument(
        "--topology",
        choices=("single", "cluster"),
        default="single",
        help="single: this machine's servers behind proxies (default); cluster: scripts/cluster.sh's three "
        "RabbitMQ nodes and PostgreSQL primary + standby, with a node stopped and the primary failed over",
    )
    ap.add_argument(
        "--private-rabbit",
        action="store_true",
        help="single topology: a RabbitMQ node of the run's own (needs root) instead of the machine's shared one; "
        "the run then also raises a disk alarm on it (a cluster run always does)",
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    ap.add_argument("--rate", type=float, default=60.0, help="orders offered per second (default 60)")
    ap.add_argument(
        "--malformed",
        type=int,
        default=None,
        help="malformed messages (default 1000, fewer below 10000 orders: orders/10)",
    )
    ap.add_argument("--worker-kills", type=int, default=20)
    ap.add_argument("--relay-kills", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds (default 3600)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (kept anyway on failure)")
    args = ap.parse_args(argv)
    if args.orders < 50:
        ap.error("--orders must be at least 50")
    cfg = ChaosConfig(
        seed=args.seed,
        orders=args.orders,
        real_restarts=args.real_restarts,
        topology=args.topology,
        private_rabbit=args.private_rabbit,
        rate=args.rate,
        malformed=args.malformed if args.malformed is not None else min(1000, max(50, args.orders // 10)),
        worker_kills=args.worker_kills,
        relay_kills=args.relay_kills,
        timeout=args.timeout,
        keep_logs=args.keep_logs,
    )
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
