"""Where a test run's servers come from (``scripts.harness.choose_servers``): plain logic, the probes
injected.  Local servers first; the missing ones in containers where Docker answers; the run stops
with one line, naming what is missing and both ways to provide it, where it does not."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from scripts import harness
from worker.settings import load_settings

ALL = {"postgres": True, "rabbitmq": True, "redis": True}
WHERE = {"postgres": "127.0.0.1:5432", "rabbitmq": "127.0.0.1:5672", "redis": "127.0.0.1:6379"}


def docker(answer: bool) -> Callable[[], bool]:
    asked: list[bool] = []

    def probe() -> bool:
        asked.append(True)
        return answer

    probe.asked = asked  # type: ignore[attr-defined]
    return probe


def never() -> bool:
    raise AssertionError("Docker was asked about although no container is wanted")


@pytest.mark.parametrize("mode", [None, "", "auto", " AUTO "])
def test_servers_that_answer_are_used_and_docker_is_not_asked(mode):
    assert harness.choose_servers(mode, ALL, never, WHERE) == harness.ServerChoice(local=harness.SERVERS)


def test_a_server_that_does_not_answer_is_started_in_a_container_the_others_stay_local():
    choice = harness.choose_servers(None, {**ALL, "rabbitmq": False}, docker(True), WHERE)
    assert (choice.local, choice.containers, choice.error) == (("postgres", "redis"), ("rabbitmq",), "")


def test_no_server_and_no_docker_stops_the_run_with_one_line_naming_what_is_missing_and_both_ways():
    probe = docker(False)
    choice = harness.choose_servers(None, {**ALL, "postgres": False, "redis": False}, probe, WHERE)
    assert (choice.local, choice.containers) == ((), ())
    assert "\n" not in choice.error
    assert "PostgreSQL (127.0.0.1:5432)" in choice.error and "Redis (127.0.0.1:6379)" in choice.error
    assert "RabbitMQ" not in choice.error  # it answers
    assert "scripts/ensure_services.sh" in choice.error and "Docker daemon" in choice.error
    assert probe.asked == [True]


def test_local_forces_the_configured_servers_and_never_asks_docker():
    assert harness.choose_servers("local", ALL, never, WHERE) == harness.ServerChoice(local=harness.SERVERS)
    choice = harness.choose_servers("local", {**ALL, "redis": False}, never, WHERE)
    assert choice.containers == () and choice.local == ()
    assert "ORDERS_TEST_SERVERS=local" in choice.error and "Redis (127.0.0.1:6379)" in choice.error
    assert "ORDERS_TEST_SERVERS=containers" in choice.error and "\n" not in choice.error


def test_containers_forces_all_three_into_docker_even_where_local_ones_answer():
    choice = harness.choose_servers("containers", ALL, docker(True), WHERE)
    assert (choice.local, choice.containers, choice.error) == ((), harness.SERVERS, "")
    refused = harness.choose_servers("containers", ALL, docker(False), WHERE)
    assert refused.containers == () and "no Docker daemon answers" in refused.error
    assert "ensure_services.sh" in refused.error and "\n" not in refused.error


def test_an_unknown_mode_is_refused_naming_the_modes():
    choice = harness.choose_servers("docker", ALL, never, WHERE)
    assert choice.error == "ORDERS_TEST_SERVERS='docker': use local, containers, or leave it unset (auto)"


def test_the_images_are_the_versions_the_service_runs_on():
    assert harness.IMAGES == {"postgres": "postgres:15", "rabbitmq": "rabbitmq:3.13", "redis": "redis:7"}


def test_the_addresses_probed_are_the_configured_ones():
    settings = load_settings(
        environ={
            "ORDERS_DATABASE__HOST": "db.example",
            "ORDERS_DATABASE__PORT": "6543",
            "ORDERS_RABBITMQ__URL": "amqps://u:p@mq.example/vh",
            "ORDERS_REDIS__PORT": "6380",
        }
    )
    assert harness.configured_servers(settings) == {
        "postgres": ("db.example", 6543),
        "rabbitmq": ("mq.example", 5671),
        "redis": ("127.0.0.1", 6380),
    }


def test_an_address_answers_when_something_listens_there():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert harness.tcp_answers("127.0.0.1", port)
    assert not harness.tcp_answers("127.0.0.1", port, timeout=0.5)


def test_a_proxy_url_keeps_the_user_and_the_vhost():
    url = "amqp://guest:secret@10.0.0.5:5673/orders-test-1?heartbeat=5"
    assert harness.amqp_port(url) == 5673 and harness.amqp_port("amqps://h/") == 5671
    assert harness.with_amqp_port(url, 41000) == "amqp://guest:secret@127.0.0.1:41000/orders-test-1?heartbeat=5"
    assert harness.vhost_url(url, "a/b") == "amqp://guest:secret@10.0.0.5:5673/a%2Fb?heartbeat=5"
    assert harness.vhost_url(url, "") == "amqp://guest:secret@10.0.0.5:5673/%2F?heartbeat=5"
