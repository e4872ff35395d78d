"""The message contract as an AsyncAPI 3.0 document (schema/asyncapi.py, docs/asyncapi.yaml, /asyncapi.json).

The document must be valid AsyncAPI 3.0 (the JSON Schema in ../shared/specs/asyncapi), name every route
of schema/topology.py with its model's JSON Schema, describe what the service really publishes (the
golden event bodies validate against it), be what is checked in, and be what the shim serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ConfigDict, with_config
from starlette.testclient import TestClient

from schema import asyncapi, messages, topology
from scripts import check_asyncapi
from scripts.tcp_proxy import free_port
from tests.support import place_body
from tests.unit.test_event_bodies import GOLDEN
from worker.rabbit.connection import Delivery
from worker.settings import load_settings
from worker.settlement import failure_headers
from worker.shim.app import create_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi.document()


def payload_validator(doc: dict[str, Any], message: dict[str, Any]) -> jsonschema.Draft7Validator:
    """A validator of ``message``'s payload, its ``$ref``s resolved inside the document."""
    return jsonschema.Draft7Validator(
        {**message["payload"], "components": doc["components"]}, format_checker=jsonschema.FormatChecker()
    )


def message_of(doc: dict[str, Any], channel: str) -> dict[str, Any]:
    [ref] = [m["$ref"] for m in doc["channels"][channel]["messages"].values()]
    return doc["components"]["messages"][ref.rsplit("/", 1)[1]]


def test_the_document_is_valid_asyncapi_3_and_every_reference_resolves(doc):
    assert check_asyncapi.SPEC.exists(), "the shared/ folder must lie beside the repository (CI puts a copy there)"
    assert check_asyncapi.invalid(doc) == []
    assert doc["asyncapi"] == "3.0.0"


def test_an_invalid_document_or_a_dangling_reference_is_found(doc):
    broken = json.loads(json.dumps(doc))
    broken["operations"]["receivePlaceOrder"]["action"] = "consume"
    del broken["components"]["schemas"]["Item"]
    problems = check_asyncapi.invalid(broken)
    assert any("/operations/receivePlaceOrder/action" in p for p in problems)
    assert any("#/components/schemas/Item points at nothing" in p for p in problems)


def test_every_command_route_is_a_channel_the_service_receives_from_and_answers(doc):
    for r in topology.COMMAND_ROUTES:
        channel = doc["channels"][r.routing_key]
        amqp = channel["bindings"]["amqp"]
        assert (channel["address"], amqp["exchange"]["name"], amqp["exchange"]["type"]) == (
            r.routing_key,
            topology.COMMANDS_EXCHANGE,
            "direct",
        )
        assert amqp["x-queue"]["name"] == r.queue
        message = message_of(doc, r.routing_key)
        assert message["payload"] == {"$ref": f"#/components/schemas/{r.message_type}"}
        assert message["headers"]["properties"]["type"]["const"] == r.message_type
        assert message["headers"]["required"] == ["message_id", "type"]
        assert {"message_id", "type", "correlation_id", "reply_to", "user_id"} <= set(message["headers"]["properties"])
        op = doc["operations"][f"receive{r.message_type}"]
        assert op["action"] == "receive" and op["channel"] == {"$ref": f"#/channels/{r.routing_key}"}
        assert op["reply"]["address"]["location"] == "$message.header#/reply_to"


def test_every_internal_command_is_sent_and_received_by_the_service(doc):
    for r in topology.PAYMENT_ROUTES:
        channel = doc["channels"][r.routing_key]
        amqp = channel["bindings"]["amqp"]
        assert (amqp["exchange"]["name"], amqp["x-queue"]["name"]) == (topology.INTERNAL_EXCHANGE, r.queue)
        assert message_of(doc, r.routing_key)["payload"] == {"$ref": f"#/components/schemas/{r.message_type}"}
        for action in ("send", "receive"):
            assert doc["operations"][f"{action}{r.message_type}"]["action"] == action


def test_every_event_route_is_a_channel_the_service_sends_with_its_model(doc):
    for e in topology.EVENT_ROUTES:
        channel = doc["channels"][e.routing_key]
        amqp = channel["bindings"]["amqp"]
        assert (channel["address"], amqp["exchange"]["name"], amqp["exchange"]["type"]) == (
            e.routing_key,
            e.exchange,
            "topic",
        )
        message = message_of(doc, e.routing_key)
        assert message["name"] == e.message_type and message["summary"] == e.summary
        assert message["payload"] == {"$ref": f"#/components/schemas/{e.event.__name__}"}
        assert message["headers"]["properties"]["type"] == {"const": e.message_type}
        ops = [op for op in doc["operations"].values() if op["channel"]["$ref"] == f"#/channels/{e.routing_key}"]
        assert [op["action"] for op in ops] == ["send"]
    schemas = doc["components"]["schemas"]
    for model in {e.event for e in topology.EVENT_ROUTES} | {messages.CommandOutcome}:
        assert model.__name__ in schemas


def test_what_the_service_publishes_validates_against_the_document(doc):
    rows = json.loads(GOLDEN.read_text())
    for row in rows:
        channel = row["routing_key"]
        message = message_of(doc, channel)
        body = json.loads(row["body"].replace("<occurred_at>", "2025-01-02T03:04:05.678901+00:00"))
        payload_validator(doc, message).validate(body)
        jsonschema.Draft7Validator(message["headers"]).validate({"message_id": row["event_id"], "type": row["type"]})
    place = message_of(doc, "order.place")
    payload_validator(doc, place).validate(place_body())
    with pytest.raises(jsonschema.ValidationError):
        payload_validator(doc, place).validate({**place_body(), "price": 1})  # unknown fields are refused
    refused = message_of(doc, "command.refused")
    with pytest.raises(jsonschema.ValidationError):  # the contract has no null reason
        payload_validator(doc, message_of(doc, "order.placed")).validate(
            {**json.loads(rows[1]["body"].replace("<occurred_at>", "2025-01-02T03:04:05+00:00")), "reason": None}
        )
    assert refused["payload"] == {"$ref": "#/components/schemas/CommandRefused"}


def test_the_dead_letter_headers_are_those_the_worker_adds():
    d = Delivery(
        delivery_tag=1,
        exchange=topology.COMMANDS_EXCHANGE,
        routing_key="order.place",
        queue="orders.place",
        body=b"{}",
        message_id="m-1",
        message_type="PlaceOrder",
        correlation_id=None,
        reply_to=None,
        content_type="application/json",
        headers={},
        redelivered=False,
    )
    added = set(failure_headers(d, "RuntimeError", "boom", "Traceback ..."))
    assert added == set(topology.FAILURE_HEADERS)
    headers = asyncapi.document()["components"]["messages"]["DeadLetter"]["headers"]["properties"]
    assert set(headers) == set(topology.FAILURE_HEADERS) | {topology.SENDER_HEADER, "x-death"}


def test_the_checked_in_document_is_what_the_code_generates(doc):
    text = asyncapi.render(doc)
    assert check_asyncapi.drift(text) == "", "run: .venv/bin/orders asyncapi --output docs/asyncapi.yaml"
    assert yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text()) == doc
    assert asyncapi.render() == text  # deterministic


def test_a_field_added_to_a_model_makes_the_check_fail(monkeypatch):
    @with_config(ConfigDict(extra="forbid", strict=True))
    class OrderShipped(messages.OrderShipped):  # the same name: the model itself, changed
        gift_wrapped: bool

    changed = tuple(
        topology.EventRoute(OrderShipped, e.exchange, e.routing_key, e.message_type, e.summary)
        if e is topology.ORDER_SHIPPED
        else e
        for e in topology.EVENT_ROUTES
    )
    monkeypatch.setattr(topology, "EVENT_ROUTES", changed)
    diff = check_asyncapi.drift(asyncapi.render())
    assert "+        gift_wrapped:" in diff and diff.startswith("--- docs/asyncapi.yaml")


def test_the_check_script_and_the_cli_agree_with_the_checked_in_file(tmp_path):
    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_asyncapi.py")], capture_output=True, text=True, timeout=120
    )
    assert script.returncode == 0, script.stdout + script.stderr
    stale = tmp_path / "asyncapi.yaml"
    stale.write_text(asyncapi.render().replace("title: Order service messages", "title: Orders"))
    orders = str(Path(sys.executable).parent / "orders")
    cli = subprocess.run([orders, "asyncapi", "--check", str(stale)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and "+  title: Order service messages" in cli.stdout
    assert "orders asyncapi --output" in cli.stderr


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = load_settings(environ={"ORDERS_REDIS__PORT": str(free_port())})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_the_shim_serves_the_document_unauthenticated_beside_the_openapi(client, doc):
    first = client.get("/asyncapi.json")
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    assert first.json() == doc
    assert client.get("/asyncapi.json").content == first.content  # generated once per process
    assert "/asyncapi.json" not in client.get("/openapi.json").json()["paths"]
