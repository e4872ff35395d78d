"""The message contract as an AsyncAPI 3.0 document, generated from ``schema/``.

Channels are the routes of :mod:`schema.topology` (one per routing key, on its exchange: the commands
upstream services send, the payment step's internal commands, the events), plus the reply queue a
command names in ``reply_to`` and the dead-letter queue.  Messages carry their model's JSON Schema
(:mod:`schema.messages`, through pydantic) as payload and their AMQP properties as headers.  Operations
are the service's: it *receives* the commands (and answers in ``reply_to``), *sends* and *receives* its
internal commands, *sends* the events and the dead letters.

``docs/asyncapi.yaml`` is :func:`render` of :func:`document`, checked in; ``orders asyncapi`` writes it,
``scripts/check_asyncapi.py`` (run by ``scripts/check.sh``) fails when the file differs from what the
code generates or when the document is not valid AsyncAPI 3.0, and the shim serves it as
``/asyncapi.json``.  An upstream team generates its client from it as from the OpenAPI document.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml
from pydantic import TypeAdapter

from schema import messages, topology
from schema.topology import EventRoute, Route

VERSION = "3.0.0"
#: the contract's version (v1, as ``docs/contract.md`` and the HTTP API say)
CONTRACT_VERSION = "1.0.0"
_AMQP = "0.3.0"  # the AMQP bindings' version
_SCHEMAS = "#/components/schemas/{model}"

_DESCRIPTION = """\
The messages of the order service on RabbitMQ: the commands upstream services publish on `orders.commands`,
the reply a command gets in its `reply_to`, the events the service publishes on `inventory` and
`orders.events` (through its transactional outbox, each with a stable `message_id`: deduplicate on it), the
payment step's internal commands on `orders.internal`, and the dead letters in `orders.dead-letter`.

A command is applied exactly once per `message_id`; a queue accepts only its own command (`type`); bodies
are JSON, strict (unknown fields, duplicate keys and control characters in strings are invalid). In
production each publisher has a broker user of its own, named in `user_id` (RabbitMQ checks it), and a
command has only the effects its sender is entitled to.

Generated from the code (`orders asyncapi`); the guarantees and the order lifecycle are in
`docs/contract.md`, the HTTP API in the shim's `/openapi.json`.
"""

#: the traceparent application header (W3C trace context), on commands and, with tracing on, on events
_TRACEPARENT = {
    "type": "string",
    "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    "description": "Application header: W3C trace context; with tracing on, the processing joins this trace.",
}
_HEADERS_NOTE = "AMQP basic properties of the message (and `traceparent`, an application header)."


def _command_headers(route: Route, internal: bool) -> dict[str, Any]:
    sender = (
        "The service's own broker user: only it may publish to `orders.internal`."
        if internal
        else "The publisher's broker user, checked by RabbitMQ against the connection; required in production "
        "(the `senders` setting says what each user may send)."
    )
    properties: dict[str, Any] = {
        "message_id": {
            "type": "string",
            "minLength": 1,
            "maxLength": messages.MAX_MESSAGE_ID,
            "description": "The idempotency key: the command is applied once per `message_id`.",
        },
        "type": {"const": route.message_type, "description": "The command's name; a queue takes only its own."},
        "content_type": {"const": "application/json"},
        "delivery_mode": {"const": 2, "description": "Persistent."},
        "correlation_id": {
            "type": "string",
            "description": "Carried into the events the command causes, its reply and the logs.",
        },
        "user_id": {"type": "string", "description": sender},
    }
    if not internal:
        properties["reply_to"] = {
            "type": "string",
            "pattern": "^(amq\\.rabbitmq\\.reply-to|amq\\.gen-)",
            "description": "Where the outcome is published (`CommandOutcome`): RabbitMQ direct reply-to or a "
            "server-named exclusive queue; any other value is ignored (the command is still applied).",
        }
    properties["traceparent"] = _TRACEPARENT
    return {
        "type": "object",
        "description": _HEADERS_NOTE,
        "properties": properties,
        "required": ["message_id", "type"],
    }


def _event_headers(message_type: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": _HEADERS_NOTE,
        "properties": {
            "message_id": {"type": "string", "format": "uuid", "description": "The event id (`event_id` of the body)."},
            "type": {"const": message_type},
            "content_type": {"const": "application/json"},
            "delivery_mode": {"const": 2, "description": "Persistent."},
            "correlation_id": {
                "type": "string",
                "description": "The `correlation_id` of the command that caused it (absent when it had none).",
            },
            "timestamp": {"type": "integer", "description": "When it was written to the outbox (Unix seconds)."},
            "app_id": {"const": "orders"},
            "traceparent": _TRACEPARENT,
        },
        "required": ["message_id", "type"],
    }


def _operation_id(action: str, name: str) -> str:
    """``send`` + ``order.placed`` → ``sendOrderPlaced``; ``receive`` + ``PlaceOrder`` → ``receivePlaceOrder``."""
    words = name.replace("-", ".").replace("_", ".").split(".")
    return action + "".join(w[:1].upper() + w[1:] for w in words)


def _exchange_binding(exchange: str, queue: str | None = None) -> dict[str, Any]:
    binding: dict[str, Any] = {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": exchange,
                "type": topology.EXCHANGE_TYPES[exchange],
                "durable": True,
                "autoDelete": False,
            },
            "bindingVersion": _AMQP,
        }
    }
    if queue is not None:
        binding["amqp"]["x-queue"] = {"name": queue, "type": "quorum", "durable": True}
    return binding


def _schemas() -> tuple[dict[str, Any], dict[str, str]]:
    """``components.schemas`` (every model and what it uses) and the schema name of each model."""
    models: list[type[Any]] = [r.command for r in (*topology.COMMAND_ROUTES, *topology.PAYMENT_ROUTES)]
    models += list(dict.fromkeys(r.event for r in topology.EVENT_ROUTES))
    models.append(messages.CommandOutcome)
    inputs = [(m.__name__, "validation", TypeAdapter(m)) for m in models]
    top, definitions = TypeAdapter.json_schemas(inputs, ref_template=_SCHEMAS)  # type: ignore[arg-type]
    names = {}
    for m in models:
        ref = top[(m.__name__, "validation")]["$ref"]
        names[m.__name__] = ref.rsplit("/", 1)[1]
    return _asyncapi_schemas(definitions.get("$defs", {})), names


def _asyncapi_schemas(schemas: dict[str, Any]) -> dict[str, Any]:
    """pydantic's JSON Schemas as AsyncAPI Schema Objects: its OpenAPI-style ``discriminator`` objects go (the
    ``oneOf`` of ``const`` providers says the same; AsyncAPI's ``discriminator`` is a property name of a base
    schema, which a union is not)."""
    out = copy.deepcopy(schemas)

    def strip(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("discriminator"), dict):
                del node["discriminator"]
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    strip(out)
    return dict(sorted(out.items()))


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the message contract (a plain dict, deterministic)."""
    schemas, names = _schemas()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    components_messages: dict[str, Any] = {}

    reply_schema = names[messages.CommandOutcome.__name__]
    components_messages["CommandOutcome"] = {
        "name": "CommandOutcome",
        "title": "The outcome of a command",
        "summary": "What applying a command came to, published to its `reply_to` when it named one.",
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "description": "AMQP basic properties of the reply.",
            "properties": {
                "correlation_id": {
                    "type": "string",
                    "description": "The command's `correlation_id`, else its `message_id`.",
                },
                "type": {"const": "CommandOutcome"},
                "delivery_mode": {"const": 1, "description": "Transient."},
            },
            "required": ["correlation_id", "type"],
        },
        "correlationId": {"location": "$message.header#/correlation_id"},
        "payload": _ref("components", "schemas", reply_schema),
        "bindings": {"amqp": {"messageType": "CommandOutcome", "bindingVersion": _AMQP}},
    }
    channels["reply"] = {
        "address": None,
        "title": "A command's reply queue",
        "description": "The queue a command names in `reply_to`: RabbitMQ direct reply-to (`amq.rabbitmq.reply-to`) "
        "or a server-named exclusive queue (`amq.gen-…`), published to through the default exchange.",
        "messages": {"CommandOutcome": _ref("components", "messages", "CommandOutcome")},
    }

    for r in topology.COMMAND_ROUTES:
        name = r.message_type
        components_messages[name] = _command_message(r, names[name], internal=False)
        channels[r.routing_key] = {
            "address": r.routing_key,
            "title": f"{name} commands",
            "description": f"Published on `{r.exchange}` with routing key `{r.routing_key}`; the service consumes "
            f"them from the quorum queue `{r.queue}`.",
            "messages": {name: _ref("components", "messages", name)},
            "bindings": _exchange_binding(r.exchange, r.queue),
        }
        operations[_operation_id("receive", name)] = {
            "action": "receive",
            "channel": _ref("channels", r.routing_key),
            "title": f"Apply {name}",
            "summary": f"The service applies a {name} once per `message_id` and acks it after the commit.",
            "messages": [_ref("channels", r.routing_key, "messages", name)],
            "reply": {
                "address": {
                    "location": "$message.header#/reply_to",
                    "description": "The command's `reply_to` property, when it names a reply queue.",
                },
                "channel": _ref("channels", "reply"),
                "messages": [_ref("channels", "reply", "messages", "CommandOutcome")],
            },
            "bindings": {"amqp": {"ack": True, "bindingVersion": _AMQP}},
            "tags": [{"name": "commands"}],
        }

    for r in topology.PAYMENT_ROUTES:
        name = r.message_type
        components_messages[name] = _command_message(r, names[name], internal=True)
        channels[r.routing_key] = {
            "address": r.routing_key,
            "title": f"{name} (internal)",
            "description": f"Internal: the payment step's command, published by the service's outbox relay on "
            f"`{r.exchange}` with routing key `{r.routing_key}` and consumed from `{r.queue}`. Only the service's "
            "own broker user may publish or consume here.",
            "messages": {name: _ref("components", "messages", name)},
            "bindings": _exchange_binding(r.exchange, r.queue),
        }
        for action in ("send", "receive"):
            operations[_operation_id(action, name)] = {
                "action": action,
                "channel": _ref("channels", r.routing_key),
                "summary": (
                    f"The outbox relay publishes {name} after the transaction that decided it commits."
                    if action == "send"
                    else f"The payment step applies {name}: a transaction, the provider call, a transaction."
                ),
                "messages": [_ref("channels", r.routing_key, "messages", name)],
                "tags": [{"name": "internal"}],
            }

    for e in topology.EVENT_ROUTES:
        components_messages[e.routing_key] = _event_message(e, names[e.event.__name__])
        channels[e.routing_key] = {
            "address": e.routing_key,
            "title": e.routing_key,
            "description": f"Published on `{e.exchange}` ({topology.EXCHANGE_TYPES[e.exchange]}) with routing key "
            f"`{e.routing_key}`: bind a queue of your own to it.",
            "messages": {e.routing_key: _ref("components", "messages", e.routing_key)},
            "bindings": _exchange_binding(e.exchange),
        }
        operations[_operation_id("send", e.routing_key)] = {
            "action": "send",
            "channel": _ref("channels", e.routing_key),
            "summary": e.summary,
            "messages": [_ref("channels", e.routing_key, "messages", e.routing_key)],
            "bindings": {"amqp": {"deliveryMode": 2, "timestamp": True, "bindingVersion": _AMQP}},
            "tags": [{"name": "events"}],
        }

    components_messages["DeadLetter"] = _dead_letter_message()
    channels["dead-letter"] = {
        "address": topology.DEAD_LETTER_QUEUE,
        "title": "Dead letters",
        "description": f"A command that can never be applied, or that kept failing through the delay tiers, goes "
        f"to the quorum queue `{topology.DEAD_LETTER_QUEUE}` (through the fanout exchange "
        f"`{topology.DEAD_LETTER_EXCHANGE}`) with the reason; operators replay or purge it (`orders dlq`).",
        "messages": {"DeadLetter": _ref("components", "messages", "DeadLetter")},
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {"name": topology.DEAD_LETTER_QUEUE, "durable": True, "exclusive": False, "autoDelete": False},
                "bindingVersion": _AMQP,
            }
        },
    }
    operations["sendDeadLetter"] = {
        "action": "send",
        "channel": _ref("channels", "dead-letter"),
        "summary": "The service dead-letters a command it cannot apply, with headers saying where it came from and why.",
        "messages": [_ref("channels", "dead-letter", "messages", "DeadLetter")],
        "tags": [{"name": "dead letters"}],
    }

    return {
        "asyncapi": VERSION,
        "info": {
            "title": "Order service messages",
            "version": CONTRACT_VERSION,
            "description": _DESCRIPTION,
            "license": {"name": "MIT"},
            "tags": [
                {"name": "commands", "description": "What upstream services send (`orders.commands`)."},
                {"name": "events", "description": "What the service publishes (`inventory`, `orders.events`)."},
                {
                    "name": "internal",
                    "description": "The payment step's commands (`orders.internal`): the service's own.",
                },
                {"name": "dead letters", "description": "What could not be applied (`orders.dead-letter`)."},
            ],
        },
        "servers": {
            "rabbitmq": {
                "host": "{host}",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The RabbitMQ node (or any node of the cluster) the service runs on, in its vhost.",
                "variables": {"host": {"default": "localhost:5672", "description": "Host and port of a node."}},
            }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": components_messages},
    }


def _command_message(route: Route, schema: str, internal: bool) -> dict[str, Any]:
    doc = route.command.__doc__ or ""
    return {
        "name": route.message_type,
        "title": route.message_type,
        # the first paragraph of the model's docstring (its schema's description has all of it)
        "summary": " ".join(doc.strip().split("\n\n")[0].split()),
        "contentType": "application/json",
        "headers": _command_headers(route, internal),
        "correlationId": {"location": "$message.header#/correlation_id"},
        "payload": _ref("components", "schemas", schema),
        "bindings": {"amqp": {"messageType": route.message_type, "bindingVersion": _AMQP}},
    }


def _event_message(e: EventRoute, schema: str) -> dict[str, Any]:
    return {
        "name": e.message_type,
        "title": e.routing_key,
        "summary": e.summary,
        "contentType": "application/json",
        "headers": _event_headers(e.message_type),
        "correlationId": {"location": "$message.header#/correlation_id"},
        "payload": _ref("components", "schemas", schema),
        "bindings": {"amqp": {"messageType": e.message_type, "bindingVersion": _AMQP}},
    }


def _dead_letter_message() -> dict[str, Any]:
    headers: dict[str, Any] = {
        name: {"type": "integer" if name == "x-attempts" else "string", "description": text}
        for name, text in topology.FAILURE_HEADERS.items()
    }
    headers[topology.SENDER_HEADER] = {
        "type": "string",
        "description": 'The broker user that first sent the command ("" for none): it is republished as the '
        "service's own user, and a replay is judged by this sender.",
    }
    headers["x-death"] = {
        "type": "array",
        "description": "RabbitMQ's own record, on a message it dead-lettered itself after "
        f"{topology.DELIVERY_LIMIT} deliveries to workers that died holding it (reason `delivery_limit`).",
    }
    return {
        "name": "DeadLetter",
        "title": "A dead-lettered command",
        "summary": "The command as it was (body and AMQP properties kept), with headers saying why.",
        "headers": {
            "type": "object",
            "description": "Application headers added to the command's own (its AMQP properties are kept).",
            "properties": headers,
            "required": ["x-original-queue", "x-error-class", "x-error-message", "x-attempts"],
        },
        "payload": {"description": "The command's body, unchanged (whatever it was, also when it was not valid)."},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (descriptions) as literal blocks, to read and to diff."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(doc: dict[str, Any] | None = None) -> str:
    """The document as the YAML checked into ``docs/asyncapi.yaml``."""
    text = yaml.dump(
        document() if doc is None else doc,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=120,
        default_flow_style=False,
    )
    return "# Generated by `orders asyncapi` from schema/ (schema/asyncapi.py): do not edit.\n" + text


def as_json(doc: dict[str, Any] | None = None) -> bytes:
    """The document as JSON (what the shim serves at ``/asyncapi.json``)."""
    return json.dumps(document() if doc is None else doc, ensure_ascii=False).encode()
