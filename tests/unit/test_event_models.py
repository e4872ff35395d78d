"""Events as models: each route of ``schema.topology`` has its model, handlers name routes (never a routing
key), what is published validates against the model, and the vocabularies (statuses, results) exist once."""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import jsonschema
import pytest
from pydantic import TypeAdapter, ValidationError

from handlers.orders import Status
from handlers.outcome import Outcome, OutcomeResult, ResultName
from schema import messages, topology
from schema.messages import ORDER_STATUSES
from schema.topology import EVENT_ROUTES, ROUTES
from tests.unit.test_event_bodies import GOLDEN

HANDLERS = Path(__file__).resolve().parents[2] / "handlers"
ROUTING_KEYS = {r.routing_key for r in EVENT_ROUTES} | {r.routing_key for r in ROUTES.values()}


def published() -> list[tuple[topology.EventRoute, str]]:
    """(route, body as published) of every event in the golden file."""
    by_key = {r.routing_key: r for r in EVENT_ROUTES}
    rows = json.loads(GOLDEN.read_text())
    return [(by_key[r["routing_key"]], r["body"]) for r in rows if r["exchange"] != topology.INTERNAL_EXCHANGE]


def test_no_routing_key_is_spelled_in_the_handlers():
    found = []
    for path in sorted(HANDLERS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ROUTING_KEYS:
                found.append(f"{path.relative_to(HANDLERS.parent)}:{node.lineno}: {node.value!r}")
    assert found == [], "name the route of schema/topology.py instead:\n" + "\n".join(found)


def test_every_event_route_is_distinct_and_typed_by_its_exchange():
    keys = [r.routing_key for r in EVENT_ROUTES]
    assert len(keys) == len(set(keys))
    for r in EVENT_ROUTES:
        if r.exchange == topology.INVENTORY_EXCHANGE:
            assert r.event is messages.StockEvent and r.routing_key.startswith("stock.")
        else:
            assert r.exchange == topology.EVENTS_EXCHANGE
        # the AMQP type as consumers get it today: the routing key, CommandRefused for a refusal
        assert r.message_type == ("CommandRefused" if r is topology.COMMAND_REFUSED else r.routing_key)


def test_what_is_published_validates_against_its_model_and_its_json_schema():
    checked = set()
    for route, text in published():
        body = json.loads(text)
        again = route.body(body)
        assert list(again.items()) == list(body.items())  # same fields, same order: the model is the layout
        schema = TypeAdapter(route.event).json_schema()
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(body)
        checked.add(route.routing_key)
    assert checked == {r.routing_key for r in EVENT_ROUTES}


@pytest.mark.parametrize(
    "change",
    [
        {"surprise": 1},  # a field the model does not have
        {"reason": None},  # left out when it does not apply, never null
        {"total": "450"},  # strict: no coercion
        {"currency": 840},
    ],
)
def test_a_body_the_contract_does_not_allow_is_refused_on_its_way_out(change):
    route, text = next((r, t) for r, t in published() if r is topology.ORDER_PLACED)
    with pytest.raises(ValidationError):
        route.body({**json.loads(text), **change})


def test_a_refund_needs_its_amount_and_whether_it_is_full():
    route, text = next((r, t) for r, t in published() if r is topology.ORDER_REFUNDED)
    body = json.loads(text)
    for field in ("amount_refunded", "full"):
        with pytest.raises(ValidationError):
            route.body({k: v for k, v in body.items() if k != field})


def test_order_statuses_exist_once():
    assert ORDER_STATUSES == tuple(s.value for s in Status)


def test_outcome_results_are_an_enum_with_the_documented_values():
    assert tuple(OutcomeResult) == tuple(typing.get_args(ResultName))
    assert [r.value for r in OutcomeResult] == ["applied", "rejected", "refused", "duplicate", "unchanged", "settling"]
    assert Outcome("settling", "o").result is OutcomeResult.SETTLING  # a string names a member
    with pytest.raises(ValueError):
        Outcome("maybe")  # type: ignore[arg-type]
    body = Outcome(OutcomeResult.REFUSED, "o", error="not_found").as_dict()
    assert body == {"result": "refused", "order_id": "o", "error": "not_found"} and type(body["result"]) is str
    reply = json.dumps({**body, "order_id": "00000000-0000-4000-8000-000000000001"})
    assert TypeAdapter(messages.CommandOutcome).validate_json(reply)["result"] is OutcomeResult.REFUSED
