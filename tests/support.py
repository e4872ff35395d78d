"""Helpers shared by the test modules (``from tests.support import ...``).

Test modules are imported by pytest's importlib mode, so they cannot import
``conftest``; the repository root is on ``sys.path`` (conftest puts it
there), which makes this module importable as ``tests.support``.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scripts import harness
from scripts.harness import wait_until

__all__ = [
    "ExportedSpan",
    "HoldingServer",
    "OtlpCollector",
    "dead_outbox_rows",
    "place_body",
    "private_vhost",
    "wait_until",
]


def place_body(
    user: str = "user-1", items: list[tuple[str, int]] | None = None, order_id: str | None = None
) -> dict[str, Any]:
    """A PlaceOrder body (a Stripe card payment)."""
    body: dict[str, Any] = {
        "user_id": user,
        "items": [{"product_id": p, "quantity": q} for p, q in (items or [("sku-apple", 2)])],
        "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
    }
    if order_id:
        body["order_id"] = order_id
    return body


def private_vhost(settings: Any, name: str) -> str:
    """A RabbitMQ vhost of this module's own (when rabbitmqctl is at hand), topology declared.

    Other test runs on this machine share the test vhost; a worker of theirs
    must never consume this module's commands.
    """
    from worker.rabbit.connection import BlockingBroker
    from worker.rabbit.topology import declare_topology

    url = settings.rabbitmq.url.get_secret_value()
    if harness.private_vhost_or_default(name):
        url = harness.vhost_url(url, name)
    broker = BlockingBroker(url).connect()
    declare_topology(broker.channel(), settings.worker.retry_delays_seconds)
    broker.close()
    return url


class HoldingServer:
    """A TCP port that accepts connections and holds them, never sending a byte: what a black-holed
    or deliberately slow host looks like to a client (a TLS handshake there waits for its timeout).
    ``accepted`` counts the connections made to it; :meth:`stop` closes them all."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, name="holding-server", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._held.append(conn)
            self.accepted += 1

    def stop(self) -> None:
        self._stopped.set()
        self.listener.close()
        for conn in self._held:
            conn.close()


@dataclass
class ExportedSpan:
    """A span as an OTLP collector received it (ids in hex)."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)


class OtlpCollector:
    """An OTLP/HTTP collector stub on loopback: keeps the spans of every ``POST /v1/traces``
    (protobuf ``ExportTraceServiceRequest``) it is sent; ``url`` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._spans: list[ExportedSpan] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the handler's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector._receive(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _receive(self, path: str, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from opentelemetry.proto.trace.v1.trace_pb2 import Span

        def value(v: Any) -> Any:
            kind = v.WhichOneof("value")
            return getattr(v, kind) if kind else None

        found = []
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    found.append(
                        ExportedSpan(
                            service=str(resource.get("service.name")),
                            name=s.name,
                            kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes={a.key: value(a.value) for a in s.attributes},
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        )
                    )
        with self._lock:
            self.paths.append(path)
            self._spans += found

    def spans(self) -> list[ExportedSpan]:
        with self._lock:
            return list(self._spans)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def dead_outbox_rows(engine: Any, n: int) -> None:
    """``n`` outbox rows written and then deleted, as the relay deletes what it published: dead rows until a
    vacuum (the caller turns autovacuum off on the table), counted in pg_stat_user_tables at once."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (event_id, exchange, routing_key, message_type, body)"
                " SELECT gen_random_uuid(), 'inventory', 'stock.reserve', 'stock.reserve', '{}'"
                " FROM generate_series(1, :n)"
            ),
            {"n": n},
        )
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM outbox"))
        conn.execute(text("SELECT pg_stat_force_next_flush()"))  # counted now, not within the second
