"""The payment window's acks on a real RabbitMQ: what it acks is what the broker drops, nothing more.

``worker.consume.Window`` acks the steps settled in a row with one
``multiple`` ack and each step settled above one still running on its own.
A ``multiple`` ack acks every unacked delivery up to its tag, and an ack of
a tag the channel does not hold closes the channel: so these tests close the
connection at chosen moments and count what comes back to the queue, which
is exactly what was not acked (and all of it, had the channel failed).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pika
import pytest

from handlers.outcome import Outcome
from worker.consume import Window
from worker.handled import Handled, Result
from worker.rabbit.connection import BlockingBroker, Delivery
from worker.reconnect import DatabaseHold
from worker.settlement import Settlement

ORDER = "5b0c6f8e-4c8e-4a57-9d1e-2f1f1f1f1f1f"


class SpyBroker(BlockingBroker):
    """The real broker, recording its acks."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.acks: list[tuple[int, bool]] = []

    def ack(self, delivery_tag: int) -> None:
        super().ack(delivery_tag)
        self.acks.append((delivery_tag, False))

    def ack_through(self, delivery_tag: int) -> None:
        super().ack_through(delivery_tag)
        self.acks.append((delivery_tag, True))


class Step:
    """Payment steps that apply at once, except those held back until released; a batch reports when done."""

    def __init__(self, *held: str) -> None:
        self.gates = {mid: threading.Event() for mid in held}
        self.reported = threading.Semaphore(0)

    def handle_batch(self, batch: list[Delivery], report: Callable[[list[Handled]], None]) -> list[Handled]:
        for d in batch:
            gate = self.gates.get(d.message_id or "")
            assert gate is None or gate.wait(10), f"{d.message_id} never released"
        done = [Handled(d, Result.APPLIED, Outcome("applied", ORDER), order_id=ORDER) for d in batch]
        report(done)
        self.reported.release()
        return done

    def wait_reports(self, n: int) -> None:
        for _ in range(n):
            assert self.reported.acquire(timeout=10), "a batch never reported"


@pytest.fixture
def queue(settings: Any) -> Iterator[tuple[str, str]]:
    url = settings.rabbitmq.url.get_secret_value()
    name = f"test-window-acks-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(name)
    yield url, name
    ch.queue_delete(name)
    conn.close()


def publish(url: str, queue: str, n: int) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    for i in range(1, n + 1):
        ch.basic_publish("", queue, b"{}", pika.BasicProperties(message_id=f"m-{i}", type="StartPayment"))
    conn.close()


def ready(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def take(broker: BlockingBroker, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < n:
        got += broker.poll(n - len(got), 2.0, 0.1)
    return got


def window(broker: BlockingBroker, step: Step, pool: ThreadPoolExecutor, batch: int) -> Window:
    hold = DatabaseHold(None, threading.Event(), broker.sleep)  # type: ignore[arg-type]  # never asked: no outage
    return Window(pool, step, hold, Settlement((1,)), 16, batch_size=batch, slots=4)  # type: ignore[arg-type]


@contextmanager
def running(queue: tuple[str, str], n: int, batch: int, held: str) -> Iterator[tuple[SpyBroker, Step, Window]]:
    """``n`` steps published, taken and submitted to a window in batches of ``batch``; ``held``'s provider call
    stays out until the test releases it; the batches without it have reported when this yields."""
    url, name = queue
    publish(url, name, n)
    broker = SpyBroker(url).connect()
    broker.consume([name], 16)
    step = Step(held)
    with ThreadPoolExecutor(4) as pool:
        w = window(broker, step, pool, batch)
        w.submit(broker, take(broker, n))
        step.wait_reports(n // batch - 1)
        yield broker, step, w


def test_what_comes_back_after_a_crash_is_exactly_the_steps_not_yet_settled(queue) -> None:
    with running(queue, 6, batch=2, held="m-1") as (broker, step, w):  # [1, 2] waits for m-1; [3, 4], [5, 6] done
        w.poll(broker)
        assert sorted(broker.acks) == [(3, False), (4, False), (5, False), (6, False)]
        broker.close()  # the process dies with m-1's provider call out
        step.gates["m-1"].set()
    assert ready(*queue) == 2  # m-1 and m-2 come back; the four acked ones do not, the channel held


def test_a_run_of_settled_steps_is_dropped_by_the_broker_with_one_multiple_ack(queue) -> None:
    with running(queue, 12, batch=4, held="m-9") as (broker, step, w):  # [1-4], [5-8] done; [9-12] waits for m-9
        w.poll(broker)
        assert broker.acks == [(8, True)]
        step.gates["m-9"].set()
        step.wait_reports(1)
        w.poll(broker)
        assert broker.acks == [(8, True), (12, True)]
        broker.sleep(0.2)  # a round trip: a channel error would be seen by now
        broker.close()
    assert ready(*queue) == 0
