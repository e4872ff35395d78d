"""Dramatiq peer of the drain: ``dramatiq peer_dramatiq -p 2 -t 8`` consumes; ``python peer_dramatiq.py N`` enqueues.

A copy of the shared peers' ``peer_dramatiq.py``; the broker comes from
``PEER_AMQP`` (default: the shared peers' own URL), so a benchmark runs it in a
vhost of its own.
"""

import os
import sys

import common
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

broker = RabbitmqBroker(url=os.environ.get("PEER_AMQP", "amqp://guest:guest@127.0.0.1:5672/"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="peer_dramatiq", max_retries=3)
def place_order(cmd):
    common.place_order(cmd)


if __name__ == "__main__":
    broker.flush_all()
    common.reset()
    for cmd in common.commands(int(sys.argv[1])):
        place_order.send(cmd)
