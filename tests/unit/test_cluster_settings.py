"""Several RabbitMQ nodes and several PostgreSQL hosts, as the settings take them."""

from __future__ import annotations

import collections

import pytest

from worker.rabbit.connection import NodeRotation, connection_parameters
from worker.rabbit.users import vhost_of
from worker.settings import SettingsError, load_settings

NODES = "amqp://o:p@127.0.0.1:5673/shop,amqp://o:p@127.0.0.1:5674/shop,amqp://o:p@127.0.0.1:5675/shop"


def test_rabbitmq_nodes_from_the_environment_comma_separated_and_every_connection_gets_all_of_them():
    s = load_settings(environ={"ORDERS_RABBITMQ__URL": NODES})
    assert s.rabbitmq.urls == NODES.split(",")
    params = connection_parameters(s.rabbitmq.url.get_secret_value(), 30)
    assert sorted(p.port for p in params) == [5673, 5674, 5675]
    assert {p.virtual_host for p in params} == {"shop"}
    assert vhost_of(s.rabbitmq.url.get_secret_value()) == "shop"


def test_rabbitmq_nodes_from_a_yaml_list(tmp_path):
    config = tmp_path / "c.yaml"
    base = load_settings()
    data = base.model_dump(mode="json")
    for section in ("database", "rabbitmq", "stripe", "paypal", "shim"):
        for key, value in list(data[section].items()):
            if value == "**********":  # secrets dump masked: give them values
                data[section][key] = "x" * 40
    data["rabbitmq"]["url"] = NODES.split(",")
    import yaml

    config.write_text(yaml.safe_dump(data))
    assert load_settings(config, environ={}).rabbitmq.urls == NODES.split(",")


def test_each_connection_takes_the_nodes_in_an_order_of_its_own_and_a_rotation_visits_every_node():
    firsts = collections.Counter(connection_parameters(NODES, 30)[0].port for _ in range(300))
    assert set(firsts) == {5673, 5674, 5675}, "one node first for every process would send them all to it"
    rotation = NodeRotation(NODES, 30)
    assert {rotation.next().port for _ in range(3)} == {5673, 5674, 5675}


def test_several_postgres_hosts_ask_libpq_for_the_primary():
    s = load_settings(environ={"ORDERS_DATABASE__HOST": "10.0.0.1,10.0.0.2", "ORDERS_DATABASE__PORT": "5442,5443"})
    db = s.database
    assert db.nodes == [("10.0.0.1", 5442), ("10.0.0.2", 5443)]
    assert "host=10.0.0.1,10.0.0.2 port=5442,5443" in db.dsn and "target_session_attrs=read-write" in db.dsn
    assert db.url.endswith("?host=10.0.0.1:5442&host=10.0.0.2:5443&target_session_attrs=read-write")
    one = load_settings(environ={"ORDERS_DATABASE__HOST": "10.0.0.1,10.0.0.2", "ORDERS_DATABASE__PORT": "5432"})
    assert one.database.nodes == [("10.0.0.1", 5432), ("10.0.0.2", 5432)]
    single = load_settings(environ={"ORDERS_DATABASE__HOST": "db", "ORDERS_DATABASE__PORT": "5432"}).database
    assert "target_session_attrs" not in single.dsn and single.url.endswith("@db:5432/" + single.dbname)


def test_a_port_list_that_does_not_match_the_hosts_is_refused():
    with pytest.raises(SettingsError, match="2 ports for 3 hosts"):
        load_settings(environ={"ORDERS_DATABASE__HOST": "a,b,c", "ORDERS_DATABASE__PORT": "1,2"})


def test_a_guest_user_on_any_node_is_refused_in_production():
    from worker import production

    s = load_settings(environ={"ORDERS_RABBITMQ__URL": NODES + ",amqp://guest:guest@127.0.0.1:5676/shop"})
    assert any(p.key == "rabbitmq.url" for p in production.problems(s))
