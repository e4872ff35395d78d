"""The broker users' permissions and the ``--print`` recipe (no broker needed)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from schema.topology import COMMAND_QUEUES, DEAD_LETTER_QUEUE, PAYMENTS_QUEUE, delay_queue
from worker.rabbit import users as broker_users
from worker.rabbit.dead_letters import DLQ_LOCK_QUEUE
from worker.settings import load_settings


def test_a_sender_user_may_write_orders_commands_and_nothing_else():
    perms = broker_users.sender_permissions()
    assert (perms.configure, perms.write, perms.read) == ("^$", r"^orders\.commands$", "^$")


def test_the_service_user_is_granted_its_own_names_only():
    perms = broker_users.service_permissions()
    own_queues = [*COMMAND_QUEUES, PAYMENTS_QUEUE, DEAD_LETTER_QUEUE, delay_queue(1), delay_queue(300)]
    for name in [*own_queues, DLQ_LOCK_QUEUE, "orders.commands", "orders.internal", "orders.delay"]:
        assert re.match(perms.configure, name), name
    for name in [*own_queues, "orders.events", "inventory", "orders.dlx", "amq.default"]:
        assert re.match(perms.write, name), name
    for name in [*own_queues, "amq.rabbitmq.reply-to"]:
        assert re.match(perms.read, name), name
    foreign = [
        "amq.gen-JzTY20BRgKO",
        "amq.topic",
        "orders.commands.extra",
        "xorders.place",
        "inventory.audit",
        "orders.delay.1m",
        "orders.dead-letter.session2",
        "shop.orders",
    ]
    for name in foreign:
        assert not any(re.match(p, name) for p in (perms.configure, perms.write, perms.read)), name
    assert not re.match(perms.read, "inventory") and not re.match(perms.read, "orders.events")


def test_the_printed_recipe_reads_passwords_from_the_environment_and_is_valid_shell(monkeypatch):
    monkeypatch.setenv("ORDERS_PASSWORD_SHOP_EU", "never-printed-1")
    script = broker_users.render(broker_users.recipe("shop/orders", "orders-service", ["shop-eu", "fulfilment"]))
    assert "never-printed-1" not in script
    assert "\"$ORDERS_PASSWORD_SHOP_EU\" | rabbitmqctl add_user 'shop-eu'" in script
    assert "\"$ORDERS_SERVICE_PASSWORD\" | rabbitmqctl add_user 'orders-service'" in script
    assert "rabbitmqctl 'set_permissions' '-p' 'shop/orders' 'shop-eu' '^$' '^orders\\.commands$' '^$'" in script
    assert "rabbitmqctl 'set_permissions' '-p' 'shop/orders' 'fulfilment' '^$' '^orders\\.commands$' '^$'" in script
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0


def test_the_service_user_cannot_also_be_a_sender():
    with pytest.raises(broker_users.UserSetupError, match="both"):
        broker_users.recipe("/", "orders", ["shop", "orders"])


def test_the_printed_sender_map_reads_back_as_the_setting_it_stands_for():
    text = broker_users.sender_map_yaml(broker_users.DEFAULT_SENDERS)
    data = yaml.safe_load(text)["senders"]
    settings = load_settings(environ={"ORDERS_SENDERS": json.dumps(data)})
    assert {u: (g.commands, g.admin, g.providers) for u, g in settings.senders.items()} == broker_users.DEFAULT_SENDERS


def test_the_vhost_comes_from_the_configured_url():
    assert broker_users.vhost_of("amqp://u:p@mq:5672/shop%2Forders") == "shop/orders"
    assert broker_users.vhost_of("amqp://u:p@mq:5672/") == "/"
    assert broker_users.vhost_of("amqp://mq") == "/"
