"""The chaos run's view of its queues: ``rabbitmqctl list_queues``' columns read per queue, and a queue that is
not empty at the end said with where its messages are (ready, delivered, or dead-lettered and not yet confirmed
by their target: a quorum queue's ``messages`` counts those too, and RabbitMQ sends them again only after its
publisher-confirm timeout)."""

from __future__ import annotations

from scripts.chaos.observe import describe_depth, parse_queue_states


def test_the_columns_are_read_per_queue_and_other_lines_are_left_out():
    text = "orders.place\t0\t0\t0\norders.delay.1s\t6\t0\t0\nTimeout: 60.0 seconds ...\norders.payments\t12\t4\t8\n"
    assert parse_queue_states(text) == {
        "orders.place": (0, 0, 0),
        "orders.delay.1s": (6, 0, 0),
        "orders.payments": (12, 4, 8),
    }


def test_messages_that_are_neither_ready_nor_delivered_are_said_to_await_a_confirm():
    assert describe_depth("orders.delay.1s", (6, 0, 0)) == (
        "orders.delay.1s: 6 messages (0 ready, 0 unacknowledged, 6 dead-lettered awaiting a confirm)"
    )


def test_ready_messages_alone_are_said_as_before():
    assert describe_depth("orders.delay.1s", (6, 6, 0)) == "orders.delay.1s: 6 messages"
    assert describe_depth("orders.payments", (12, 4, 8)) == (
        "orders.payments: 12 messages (4 ready, 8 unacknowledged, 0 dead-lettered awaiting a confirm)"
    )
