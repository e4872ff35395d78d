#!/usr/bin/env python3
"""CPU per message of acking one at a time against one ``multiple`` ack per run (a benchmark, not a test).

The payment window (``worker.consume.Window``) acks the steps a batch
settles: it used to send one ``basic.ack`` per step; it now acks a run of
steps settled in a row with one ``multiple`` ack (each step settled above one
still running is still acked on its own, at once).  This measures what that
is worth, on the real broker: N messages published to a queue of its own,
consumed through ``worker.rabbit.connection.BlockingBroker`` as the payment
consumer does (prefetch 200, polls of up to 50), and acked either

* ``single``: one ``basic.ack`` per message, or
* ``multiple``: one ``basic.ack(multiple=True)`` per group of ``--group``
  messages (20 by default: about a recorded wave of ``bench_paid.py``'s
  payment steps at saturation),

in alternating rounds.  Printed, medians: µs of the consumer thread's CPU per
message (receiving included), µs of RabbitMQ's CPU per message (its ``beam.smp``,
from ``/proc``; anything else using the broker meanwhile counts too), and
messages/s.

Usage::

    .venv/bin/python scripts/bench_acks.py [--messages 20000] [--rounds 5] [--group 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.benchkit import HZ, parse_stat  # noqa: E402
from worker.rabbit.connection import BlockingBroker  # noqa: E402
from worker.settings import load_settings  # noqa: E402


def beam_pid() -> int | None:
    found = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def ticks(pid: int | None) -> int:
    return 0 if pid is None else parse_stat(Path(f"/proc/{pid}/stat").read_text()).own


def fill(url: str, queue: str, n: int) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_purge(queue)
    props = pika.BasicProperties(message_id="m", type="StartPayment", content_type="application/json")
    for _ in range(n):
        ch.basic_publish("", queue, b'{"order_id": "5b0c6f8e-4c8e-4a57-9d1e-2f1f1f1f1f1f"}', props)
    conn.close()


def consume(url: str, queue: str, n: int, mode: str, group: int, beam: int | None) -> tuple[float, float, float]:
    broker = BlockingBroker(url).connect()
    broker.consume([queue], 200)
    got = 0
    cpu, rabbit, wall = time.thread_time(), ticks(beam), time.perf_counter()
    while got < n:
        batch = broker.poll(50, 1.0, 0.002)
        for i in range(0, len(batch), group):
            part = batch[i : i + group]
            if mode == "single":
                for d in part:
                    broker.ack(d.delivery_tag)
            else:
                broker.ack_through(part[-1].delivery_tag)
        got += len(batch)
    cpu, rabbit, wall = time.thread_time() - cpu, ticks(beam) - rabbit, time.perf_counter() - wall
    broker.close()
    return cpu / n * 1e6, rabbit / HZ / n * 1e6, n / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--group", type=int, default=20, help="messages per multiple ack (default 20)")
    args = ap.parse_args()
    url = load_settings(environ={"ORDERS_ENVIRONMENT": "development", **os.environ}).rabbitmq.url.get_secret_value()
    queue = f"bench-acks-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_declare(queue)
    beam = beam_pid()
    results: dict[str, list[tuple[float, float, float]]] = {"single": [], "multiple": []}
    try:
        for r in range(args.rounds):
            for mode in ("single", "multiple") if r % 2 == 0 else ("multiple", "single"):
                fill(url, queue, args.messages)
                results[mode].append(consume(url, queue, args.messages, mode, args.group, beam))
    finally:
        conn.channel().queue_delete(queue)
        conn.close()
    print(f"{args.messages} messages per round, {args.rounds} rounds alternating, multiple ack per {args.group}")
    print("| acks | consumer µs/message | RabbitMQ µs/message | messages/s |")
    print("|---|---:|---:|---:|")
    for mode, runs in results.items():
        med = [statistics.median(x[i] for x in runs) for i in range(3)]
        print(f"| {mode} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.0f} |")
    if beam is None:
        print("(no beam.smp found: RabbitMQ's CPU not measured)")


if __name__ == "__main__":
    main()
