"""Tracing (worker/tracing.py): off unless configured, and then what it sets up and what it carries.

The "off" checks run in a fresh interpreter, so nothing another test imported
or installed can hide an SDK set-up; the "on" checks export to the SDK's
in-memory exporter, or over real OTLP/HTTP to a collector stub on loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.support import OtlpCollector
from worker import tracing
from worker.rabbit.connection import Delivery, Outgoing
from worker.settings import TracingSettings

ROOT = Path(__file__).resolve().parents[2]
SET = TracingSettings(otlp_endpoint="http://collector:4318")
OFF = TracingSettings()


@pytest.mark.parametrize(
    "settings, environ, expected",
    [
        (OFF, {}, None),
        (OFF, {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, None),  # nothing says where to
        (SET, {}, "otlp"),
        (OFF, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "otlp"),
        (OFF, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "otlp"),
        (OFF, {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, None),
        (OFF, {"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),  # the exporter's default endpoint
        (OFF, {"OTEL_TRACES_EXPORTER": "console"}, "console"),
        (SET, {"OTEL_TRACES_EXPORTER": "none"}, None),
        (SET, {"OTEL_SDK_DISABLED": "true"}, None),
        (OFF, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, None),
    ],
)
def test_tracing_is_on_only_when_the_setting_or_the_standard_variables_ask(settings, environ, expected):
    assert tracing.wanted(settings, environ) == expected


def test_an_exporter_the_service_does_not_ship_is_named_and_leaves_tracing_off(caplog):
    with pytest.raises(tracing.TracingError, match="zipkin"):
        tracing.wanted(OFF, {"OTEL_TRACES_EXPORTER": "zipkin"})
    assert tracing.setup(OFF, "orders-test", {"OTEL_TRACES_EXPORTER": "zipkin"}) is False
    assert not tracing.ACTIVE
    assert "tracing stays off" in caplog.text


def test_the_setting_names_the_collector_as_the_standard_variable_does():
    assert tracing.traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("https://c.example/v1/traces") == "https://c.example/v1/traces"


OFF_PROBE = """
import json, sys
from opentelemetry import trace
from worker import tracing
from worker.settings import load_settings
from worker.shim.publisher import Envelope
from worker.unit_of_work import PostgresUnitOfWork
from schema.messages import PlaceOrder

settings = load_settings()
on = tracing.setup(settings.tracing, "orders-test")
with tracing.publish_span("orders.commands", "order.place", "PlaceOrder", "m-1") as tp:
    out = tracing.with_traceparent(Envelope.on_route(PlaceOrder, "m-1", {}).outgoing(), tp)
uow = PostgresUnitOfWork(None, "orders")
uow.emit("orders.events", "order.placed", "OrderPlaced", {}, "o-1", None, "e-1")
print(json.dumps({
    "on": on,
    "active": tracing.ACTIVE,
    "provider": type(trace.get_tracer_provider()).__name__,
    "sdk_imported": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")),
    "instrumentations": sorted(m for m in sys.modules if m.startswith("opentelemetry.instrumentation")),
    "headers": out.properties.get("headers"),
    "outbox_row": len(uow._outbox[0]),
    "traceparent": tracing.traceparent(),
}))
"""


def _probe(code: str, **env: str) -> dict[str, Any]:
    import os

    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and not k.startswith("ORDERS_")}
    environ.update({"ORDERS_ENVIRONMENT": "development", **env})
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_with_tracing_off_nothing_is_set_up_and_nothing_carries_a_traceparent():
    found = _probe(OFF_PROBE)
    assert found["on"] is False and found["active"] is False
    assert found["provider"] == "ProxyTracerProvider"  # the API's placeholder: no TracerProvider installed
    assert found["sdk_imported"] == [] and found["instrumentations"] == []
    assert found["headers"] is None  # the command goes out without a traceparent (without any header)
    assert found["outbox_row"] == 7  # the outbox row has no traceparent column to fill
    assert found["traceparent"] is None


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    c = OtlpCollector()
    yield c
    c.stop()


ON_PROBE = """
import json
from opentelemetry import trace
from worker import tracing
from worker.settings import load_settings

on = tracing.setup(load_settings().tracing, "orders-relay")
with tracing.span("probe", **{"orders.order_id": "o-1"}):
    tp = tracing.traceparent()
tracing.flush()
print(json.dumps({"on": on, "provider": type(trace.get_tracer_provider()).__name__, "traceparent": tp}))
"""


def test_the_setting_sends_spans_over_otlp_http_named_after_the_process(collector):
    found = _probe(ON_PROBE, ORDERS_TRACING__OTLP_ENDPOINT=collector.url)
    assert found["on"] is True and found["provider"] == "TracerProvider"
    assert set(collector.paths) == {"/v1/traces"}
    (span,) = collector.spans()
    assert (span.service, span.name, span.attributes) == ("orders-relay", "probe", {"orders.order_id": "o-1"})
    assert found["traceparent"].split("-")[1:3] == [span.trace_id, span.span_id]


def test_the_standard_variables_turn_it_on_and_name_the_service(collector):
    _probe(ON_PROBE, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_SERVICE_NAME="relay-eu-1")
    assert [(s.service, s.name) for s in collector.spans()] == [("relay-eu-1", "probe")]


# -- with an in-memory exporter ---------------------------------------------------------------


def _delivery(headers: dict[str, Any], tag: int = 1, message_type: str = "PlaceOrder") -> Delivery:
    return Delivery(
        tag,
        "orders.commands",
        "order.place",
        "orders.place",
        b"{}",
        f"m-{tag}",
        message_type,
        None,
        None,
        None,
        headers,
        False,
    )


def _ids(span: Any) -> tuple[int, int]:
    return span.context.trace_id, span.context.span_id


def test_log_lines_inside_a_span_carry_its_trace_and_span_ids(spans, capsys):
    from worker import logs

    saved = structlog.get_config()
    try:
        logs.configure("INFO", "json")
        log = structlog.get_logger("probe")
        log.info("outside")
        with tracing.span("work"):
            log.info("inside")
    finally:
        structlog.configure(**saved)
    outside, inside = (json.loads(line) for line in capsys.readouterr().err.splitlines()[-2:])
    (work,) = spans.get_finished_spans()
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["trace_id"] == format(work.context.trace_id, "032x")
    assert inside["span_id"] == format(work.context.span_id, "016x")


def test_a_command_without_a_traceparent_is_traced_under_its_batch(spans):
    upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    traced, plain = _delivery({"traceparent": upstream}, 1), _delivery({}, 2)
    with tracing.batch_span([traced, plain]):
        with tracing.command_span(traced, "o-1"):
            pass
        with tracing.command_span(plain, "o-2"):
            pass
    first, second, batch = spans.get_finished_spans()
    assert format(first.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"  # the sender's trace
    assert format(first.parent.span_id, "016x") == "b7ad6b7169203331"
    assert [link.context.span_id for link in first.links] == [batch.context.span_id]
    assert second.parent.span_id == batch.context.span_id and not second.links  # no trace of its own to join
    assert {link.context.span_id for link in batch.links} == {0xB7AD6B7169203331, first.context.span_id}
    assert batch.attributes["messaging.batch.message_count"] == 2


def test_the_relay_continues_each_stored_trace_and_leaves_untraced_events_alone(spans):
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    messages = [
        Outgoing("orders.events", "order.completed", b"{}", {"message_id": "e-1", "type": "OrderCompleted"}),
        Outgoing("inventory", "stock.commit", b"{}", {"message_id": "e-2", "headers": {"x-keep": "1"}}),
    ]
    published: list[Outgoing] = []
    tracing.relay_publish(published.extend, messages, [stored, None])
    event, round_span = spans.get_finished_spans()
    assert event.name == "publish orders.events" and format(event.parent.span_id, "016x") == "b7ad6b7169203331"
    assert format(event.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert published[0].properties["headers"]["traceparent"].split("-")[2] == format(event.context.span_id, "016x")
    assert published[1] is messages[1]  # written while tracing was off: published as it was
    assert [link.context.span_id for link in round_span.links] == [0xB7AD6B7169203331]
    assert [link.context.span_id for link in event.links] == [round_span.context.span_id]


def test_a_round_the_broker_did_not_confirm_ends_its_spans_as_errors(spans):
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def fails(_: list[Outgoing]) -> None:
        raise ConnectionError("broker gone")

    with pytest.raises(ConnectionError):
        tracing.relay_publish(fails, [Outgoing("orders.events", "order.placed", b"{}", {})], [stored])
    assert {s.name: s.status.status_code.name for s in spans.get_finished_spans()} == {
        "publish orders.events": "ERROR",
        "publish outbox": "ERROR",
    }


def test_sql_and_http_outside_any_work_start_no_trace(spans):
    from opentelemetry.trace import SpanKind

    tracer = tracing._provider.get_tracer("probe")  # type: ignore[union-attr]
    with tracer.start_as_current_span("SELECT 1", kind=SpanKind.CLIENT):
        pass
    with tracer.start_as_current_span("work"):
        with tracer.start_as_current_span("SELECT 2", kind=SpanKind.CLIENT):
            pass
    assert [s.name for s in spans.get_finished_spans()] == ["SELECT 2", "work"]


def test_off_again_after_uninstall(spans):
    tracing.uninstall()
    assert not tracing.ACTIVE and tracing.traceparent() is None
    with tracing.batch_span([_delivery({})]), tracing.command_span(_delivery({})):
        pass
    assert spans.get_finished_spans() == ()


def test_the_standard_sampler_variable_is_honoured(collector):
    found = _probe(ON_PROBE, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_TRACES_SAMPLER="always_off")
    assert found["on"] is True
    assert int(found["traceparent"].split("-")[3], 16) & 1 == 0  # context still flows, marked not sampled
    assert collector.spans() == []


# -- the public edge: a caller's traceparent is linked, not continued (unless the caller is trusted) ------

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


def _edge_request(spans: Any, flags: str, client: tuple[str, int], **tracing_settings: str) -> Any:
    """POST /orders (no token: 401, before any server is asked) with the caller's traceparent; its server
    span, or None when none was recorded."""
    from starlette.testclient import TestClient

    from scripts.tcp_proxy import free_port
    from worker.settings import load_settings
    from worker.shim.app import create_app

    environ = {"ORDERS_REDIS__PORT": str(free_port()), **tracing_settings}
    with TestClient(create_app(load_settings(environ=environ)), client=client) as shim:
        answer = shim.post(
            "/orders",
            content=b"{}",
            headers={
                "Content-Type": "application/json",
                "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}",
                "tracestate": "vendor=caller",
                "baggage": "user=mallory",
            },
        )
    assert answer.status_code == 401
    servers = [s for s in spans.get_finished_spans() if s.name == "POST /orders"]
    assert len(servers) <= 1
    return servers[0] if servers else None


@pytest.mark.parametrize("flags", ["01", "00"])
def test_at_the_edge_a_callers_traceparent_is_linked_and_a_trace_of_its_own_begins(spans, flags):
    server = _edge_request(spans, flags, ("203.0.113.9", 40000))
    assert server.parent is None  # a root: the caller did not choose the trace
    assert format(server.context.trace_id, "032x") != CALLER_TRACE
    assert server.context.trace_flags.sampled  # flags 00 no longer switch tracing off for the request
    assert [(format(link.context.trace_id, "032x"), format(link.context.span_id, "016x")) for link in server.links] == [
        (CALLER_TRACE, CALLER_SPAN)
    ]
    assert server.links[0].attributes["orders.link"] == "caller"
    assert server.context.trace_state.get("vendor") is None


def test_a_caller_in_trust_incoming_continues_its_trace(spans):
    server = _edge_request(spans, "01", ("10.0.3.7", 40000), ORDERS_TRACING__TRUST_INCOMING='["10.0.3.0/24"]')
    assert format(server.context.trace_id, "032x") == CALLER_TRACE
    assert server.parent is not None and format(server.parent.span_id, "016x") == CALLER_SPAN
    assert not server.links


def test_a_trusted_callers_flags_00_are_honoured(spans):
    server = _edge_request(spans, "00", ("10.0.3.7", 40000), ORDERS_TRACING__TRUST_INCOMING='["10.0.3.7"]')
    assert server is None  # not sampled, as its caller asked: not recorded
