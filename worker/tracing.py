"""OpenTelemetry tracing: off unless configured, one trace from the HTTP request to the last event.

Tracing is on when ``tracing.otlp_endpoint`` is set, or when the standard
variables ask for it (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_TRACES_EXPORTER=otlp|console``),
and not ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``.  When it
is off nothing is set up: the SDK is not even imported, :data:`ACTIVE` stays
False and every hook below is one flag test (the hot paths check it
themselves, so a batch of commands pays nothing for tracing being possible).

The W3C ``traceparent`` travels with the work:

- the shim (FastAPI instrumentation: the ``POST /orders`` server span)
  publishes each command inside a ``publish orders.commands`` PRODUCER span
  and puts that span's ``traceparent`` into the command's AMQP headers.  The
  shim is the public edge: a caller's own ``traceparent`` is a claim, not a
  parent (it would choose the trace its command joins, and flags ``00`` would
  switch tracing off for it), so the server span starts a trace of its own
  and *links* the caller's context, as OpenTelemetry advises for untrusted
  callers; only callers listed in ``tracing.trust_incoming`` are continued;
- the command consumer opens one ``process batch`` span per batch (a root of
  its own, the transaction's SQL under it) and one ``process <Type>`` span per
  command, a child of the context the command's headers carry; the two link
  each other both ways;
- the unit of work writes the current span's ``traceparent`` into each outbox
  row it emits (column ``outbox.traceparent``);
- the relay opens one ``publish outbox`` span per round, linked to every row's
  stored context, and one ``publish <exchange>`` PRODUCER span per event, a
  child of the stored context, whose ``traceparent`` goes into the published
  message's headers;
- the payment step opens ``process <Type>`` as a child of the internal
  command's headers; the provider's HTTP calls (urllib3: the Stripe SDK;
  requests: the PayPal SDK; httpx: PayPal's certificates) are spans under it.

Client spans (SQL, HTTP) that would start a trace of their own (the relay's
polling, the exporter's own requests) are dropped by the sampler: they are
recorded only as part of some piece of work.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the API and the SDK are imported only once tracing is on
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span, Tracer

    from worker.rabbit.connection import Delivery, Outgoing
    from worker.settings import TracingSettings

log = logging.getLogger("worker.tracing")

#: True once a tracer provider is installed in this process; every hook is a no-op while False
ACTIVE = False
#: the message header that carries the W3C trace context
TRACEPARENT = "traceparent"
#: instrumentation scope of the spans made here
SCOPE = "orders"
#: links a span may hold (a batch links each of its commands; the relay each event of a round)
DEFAULT_MAX_LINKS = 1024
#: endpoints the shim does not trace (probes and scrapes would be most of the traces)
UNTRACED_URLS = "/healthz,/readyz,/metrics"
#: the exporters this service ships (OTLP over HTTP/protobuf, and the console for a quick look)
EXPORTERS = ("otlp", "console")

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_instrumentors: list[Any] = []
_NULL = contextlib.nullcontext()


class TracingError(Exception):
    """Tracing is asked for in a way this service cannot honour."""


def wanted(settings: TracingSettings, environ: Mapping[str, str]) -> str | None:
    """Which exporter tracing should use ("otlp", "console"), or None when tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return None
    if exporter:
        if exporter not in EXPORTERS:
            raise TracingError(f"OTEL_TRACES_EXPORTER={exporter}: this service ships {' and '.join(EXPORTERS)} only")
        return exporter
    endpoints = (
        settings.otlp_endpoint,
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
    )
    return "otlp" if any(e.strip() for e in endpoints) else None


def traces_url(endpoint: str) -> str:
    """``tracing.otlp_endpoint`` is the collector's base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` is."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def setup(settings: TracingSettings, service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install tracing for this process when configured; True when it is on (now or already).

    ``service`` names the process (``orders-worker``, ``orders-relay``,
    ``orders-shim``) unless ``OTEL_SERVICE_NAME`` does.  Call it in the
    process that does the work (after a fork, not before).  A request for an
    exporter this service does not ship is logged and leaves tracing off: a
    tracing mistake must not stop orders.
    """
    if ACTIVE:
        return True
    environ = os.environ if environ is None else environ
    try:
        exporter = wanted(settings, environ)
    except TracingError as exc:
        log.warning("tracing stays off: %s", exc)
        return False
    if exporter is None:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanLimits
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(
            endpoint=traces_url(settings.otlp_endpoint) if settings.otlp_endpoint else None
        )
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, when set, name the service
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    limits = SpanLimits(max_links=int(environ.get("OTEL_SPAN_LINK_COUNT_LIMIT") or DEFAULT_MAX_LINKS))
    provider = SdkTracerProvider(
        resource=resource, sampler=no_orphan_clients(_configured_sampler()), span_limits=limits
    )
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    install(provider)
    log.info("tracing on (%s exporter, service %s)", exporter, resource.attributes.get(SERVICE_NAME))
    return True


def _configured_sampler() -> Sampler:
    """``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` as the SDK reads them; parent-based always-on."""
    from opentelemetry.sdk.trace import sampling

    try:
        return sampling._get_from_env_or_default()  # the SDK's own reading of the variables
    except AttributeError:  # pragma: no cover - a later SDK may move it: fall back to its default
        return sampling.ParentBased(sampling.ALWAYS_ON)


def install(provider: TracerProvider) -> None:
    """Trace this process into ``provider``: the hooks, and the HTTP client and PostgreSQL instrumentations.

    :func:`setup` calls it with the configured provider; tests call it with
    one that exports into memory (the global provider can be set only once).
    """
    global ACTIVE, _provider, _tracer
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor

    _provider, _tracer = provider, provider.get_tracer(SCOPE)
    for instrumentor, options in (
        (URLLib3Instrumentor(), {}),  # the Stripe SDK (through handlers.payments.stripe_client.Urllib3Client)
        (RequestsInstrumentor(), {}),  # the PayPal SDK (apimatic); its urllib3 requests are not traced twice
        (HTTPXClientInstrumentor(), {}),  # PayPal's webhook certificates
        (Psycopg2Instrumentor(), {"enable_commenter": False, "skip_dep_check": True}),
    ):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider, **options)
            _instrumentors.append(instrumentor)
    ACTIVE = True


def uninstall() -> None:
    """Undo :func:`install` (tests): the hooks go back to no-ops, the instrumentations come off."""
    global ACTIVE, _provider, _tracer
    ACTIVE = False
    while _instrumentors:
        _instrumentors.pop().uninstrument()
    _provider = _tracer = None


def flush() -> None:
    """Export what is still buffered (before a process ends; forked pool processes run no atexit)."""
    if _provider is not None:
        _provider.force_flush()


def instrument_app(app: Any, trust_incoming: Sequence[Any] = ()) -> None:
    """The shim's server spans (FastAPI instrumentation); health, readiness and metrics are left out.

    A request's ``traceparent`` (with ``tracestate`` and ``baggage``) is
    continued only from a caller in ``trust_incoming`` (networks); anyone
    else's request starts a trace of its own whose server span links the
    caller's context.
    """
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        excluded_urls=UNTRACED_URLS,
        exclude_spans=["receive", "send"],
        server_request_hook=_link_caller,
    )
    instrumented = app.build_middleware_stack  # the instrumentation's: its middleware is the outermost

    def build_middleware_stack() -> Any:
        return UntrustedTraceContext(instrumented(), tuple(trust_incoming))

    app.build_middleware_stack = build_middleware_stack


#: where :class:`UntrustedTraceContext` leaves the caller's span context for :func:`_link_caller`
_CALLER_CONTEXT = "orders.caller_trace_context"
#: the W3C headers an untrusted caller's request loses before the instrumentation reads it
_TRACE_HEADERS = (b"traceparent", b"tracestate", b"baggage")


class UntrustedTraceContext:
    """ASGI middleware around the instrumented app: a caller not in ``trusted`` (networks) has its
    trace headers taken off the request, so the server span is a root; a valid context it sent is
    kept in the scope, for the span to link."""

    def __init__(self, app: Any, trusted: tuple[Any, ...]) -> None:
        self.app, self.trusted = app, trusted

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._trusts(scope.get("client")):
            headers = scope.get("headers") or []
            if any(name in _TRACE_HEADERS for name, _ in headers):
                carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
                scope = {**scope, "headers": [(n, v) for n, v in headers if n not in _TRACE_HEADERS]}
                caller = _span_context_of(_remote(carrier))
                if caller is not None:
                    scope[_CALLER_CONTEXT] = caller
        await self.app(scope, receive, send)

    def _trusts(self, client: Any) -> bool:
        if not self.trusted or not client:
            return False
        import ipaddress

        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:  # not an address (a Unix socket, a test client): not a caller to trust
            return False
        return any(address in network for network in self.trusted)


def _link_caller(span: Any, scope: dict[str, Any]) -> None:
    """The server span's hook: link the context an untrusted caller sent (it is not the parent)."""
    caller = scope.get(_CALLER_CONTEXT)
    if caller is not None and span.is_recording():
        span.add_link(caller, {"orders.link": "caller"})


def no_orphan_clients(delegate: Sampler) -> Sampler:
    """A sampler: a CLIENT span with no parent (SQL or HTTP outside any piece of work: the relay's
    polling, the exporter's own requests) is dropped; everything else is up to ``delegate``
    (``OTEL_TRACES_SAMPLER``, parent-based always-on by default)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
    from opentelemetry.trace import SpanKind

    class NoOrphanClients(Sampler):
        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            if kind is SpanKind.CLIENT and not trace.get_current_span(parent_context).get_span_context().is_valid:
                return SamplingResult(Decision.DROP)
            return delegate.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"NoOrphanClients{{{delegate.get_description()}}}"

    return NoOrphanClients()


# -- context in and out of messages -------------------------------------------------------


def traceparent() -> str | None:
    """The current span's ``traceparent`` (what an outbox row stores); None without a sampled span."""
    if not ACTIVE:
        return None
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get(TRACEPARENT)


def _remote(headers: Mapping[str, Any] | None) -> Any:
    """The context a message's headers carry; None when they carry none."""
    if not headers or TRACEPARENT not in headers:
        return None
    from opentelemetry.propagate import extract

    carrier = {k: v.decode() if isinstance(v, bytes) else v for k, v in headers.items() if isinstance(v, str | bytes)}
    return extract(carrier)


def _span_context_of(context: Any) -> Any:
    """The valid span context in ``context``; None for none (or no context)."""
    if context is None:
        return None
    from opentelemetry import trace

    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, for log lines; None without one."""
    if not ACTIVE:
        return None
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def _messaging(destination: str, operation: str, **more: Any) -> dict[str, Any]:
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.destination.name": destination,
    }
    attributes.update({k: v for k, v in more.items() if v is not None})
    return attributes


# -- spans of the service's own work ------------------------------------------------------


@contextlib.contextmanager
def _batch(deliveries: Sequence[Delivery]) -> Iterator[Span]:
    from opentelemetry.trace import Link, SpanKind

    assert _tracer is not None
    links = []
    for d in deliveries:
        parent = _span_context_of(_remote(d.headers))
        if parent is not None:
            links.append(Link(parent))
    queues = sorted({d.queue for d in deliveries})
    attributes = _messaging(",".join(queues), "process", **{"messaging.batch.message_count": len(deliveries)})
    with _tracer.start_as_current_span(
        "process batch", kind=SpanKind.CONSUMER, links=links, attributes=attributes
    ) as span:
        yield span


def batch_span(deliveries: Sequence[Delivery]) -> contextlib.AbstractContextManager[Any]:
    """The span of one batch of commands: a root, linked to each command's sender (and, from
    :func:`command_span`, to each command's own span); the batch's transaction is under it."""
    return _batch(deliveries) if ACTIVE else _NULL


@contextlib.contextmanager
def _consume(d: Delivery, order_id: str | None) -> Iterator[Span]:
    from opentelemetry import trace

    span = _start_consume(d, order_id)
    with trace.use_span(span, end_on_exit=True):
        yield span


def _start_consume(d: Delivery, order_id: str | None) -> Span:
    """The span of one command or payment step, started (not current): a child of the context its headers
    carry, linked both ways with the batch around it."""
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind

    assert _tracer is not None
    around = trace.get_current_span()  # the batch, when there is one
    around_context = around.get_span_context()
    parent = _remote(d.headers)
    links = [Link(around_context)] if around_context.is_valid and parent is not None else []
    attributes = _messaging(
        d.queue,
        "process",
        **{
            "messaging.message.id": d.message_id,
            "messaging.message.conversation_id": d.correlation_id,
            "messaging.rabbitmq.destination.routing_key": d.routing_key,
            "orders.message_type": d.message_type,
            "orders.order_id": order_id,
        },
    )
    span = _tracer.start_span(
        f"process {d.message_type}", context=parent, kind=SpanKind.CONSUMER, links=links, attributes=attributes
    )
    if links:
        around.add_link(span.get_span_context())  # the batch links its commands, as they link it
    return span


class StepSpan:
    """A payment step's span across its phases: prepared in one transaction of a batch, its provider call in
    another thread, recorded in a second transaction.  ``within()`` makes it the current span of a phase (the
    events it emits store its context; the SDKs' HTTP spans go under it); ``end()`` closes it.  Nothing at all
    when tracing is off."""

    def __init__(self, d: Delivery, order_id: str | None = None) -> None:
        self.span = _start_consume(d, order_id) if ACTIVE else None

    def within(self) -> contextlib.AbstractContextManager[Any]:
        if self.span is None:
            return _NULL
        from opentelemetry import trace

        return trace.use_span(self.span, end_on_exit=False)

    def end(self, result: str, error: BaseException | None = None, order_id: str | None = None) -> None:
        if self.span is not None:
            outcome(self.span, result, error, order_id)
            self.span.end()


def command_span(d: Delivery, order_id: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """The span of one command or payment step: a child of the context its headers carry (of the
    current span when they carry none); events it emits store this span's context."""
    return _consume(d, order_id) if ACTIVE else _NULL


def outcome(span: Any, result: str, error: BaseException | None = None, order_id: str | None = None) -> None:
    """Record what became of a message on its span (a failure marks the span as an error)."""
    if not ACTIVE or span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("orders.result", result)
    if order_id:
        span.set_attribute("orders.order_id", order_id)
    if error is not None and result in ("failed", "invalid"):
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:500]))


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """An internal span (e.g. around a provider call and its retries); a no-op when tracing is off."""
    if not ACTIVE:
        return _NULL
    assert _tracer is not None
    return _tracer.start_as_current_span(name, attributes={k: v for k, v in attributes.items() if v is not None})


@contextlib.contextmanager
def _produce(exchange: str, routing_key: str, message_type: str | None, message_id: str | None) -> Iterator[str | None]:
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    attributes = _messaging(
        exchange,
        "send",
        **{
            "messaging.message.id": message_id,
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "orders.message_type": message_type,
        },
    )
    with _tracer.start_as_current_span(f"publish {exchange}", kind=SpanKind.PRODUCER, attributes=attributes):
        yield traceparent()


def publish_span(
    exchange: str, routing_key: str, message_type: str | None, message_id: str | None
) -> contextlib.AbstractContextManager[str | None]:
    """A PRODUCER span around one publish; yields the ``traceparent`` to put into the message's
    headers (None when tracing is off: the message then carries none)."""
    return _produce(exchange, routing_key, message_type, message_id) if ACTIVE else _NULL


def with_traceparent(message: Outgoing, value: str | None) -> Outgoing:
    """``message`` with ``traceparent`` in its headers (itself when there is none to add)."""
    if not value:
        return message
    from worker.rabbit.connection import Outgoing

    headers = dict(message.properties.get("headers") or {})
    headers[TRACEPARENT] = value
    return Outgoing(message.exchange, message.routing_key, message.body, {**message.properties, "headers": headers})


def relay_publish(
    publish: Callable[[list[Outgoing]], None], messages: list[Outgoing], stored: Sequence[str | None]
) -> None:
    """The relay's round: ``publish`` the events inside ``publish outbox`` (linked to every event's
    stored context), each event inside a PRODUCER span that continues its stored trace and whose
    ``traceparent`` the published message carries.  The spans end once the broker confirmed the round."""
    if not ACTIVE:
        publish(messages)
        return
    from opentelemetry import trace
    from opentelemetry.propagate import inject
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode

    assert _tracer is not None
    parents = [_span_context_of(_remote({TRACEPARENT: tp})) if tp else None for tp in stored]
    exchanges = ",".join(sorted({m.exchange for m in messages}))
    with _tracer.start_as_current_span(
        "publish outbox",
        kind=SpanKind.PRODUCER,
        links=[Link(p) for p in parents if p is not None],
        attributes=_messaging(exchanges, "send", **{"messaging.batch.message_count": len(messages)}),
    ) as round_span:
        round_link = [Link(round_span.get_span_context())]
        spans, out = [], []
        for message, parent in zip(messages, parents, strict=True):
            if parent is None:  # written while tracing was off, or by a process that does not trace
                out.append(message)
                continue
            props = message.properties
            event_span = _tracer.start_span(
                f"publish {message.exchange}",
                context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
                kind=SpanKind.PRODUCER,
                links=round_link,
                attributes=_messaging(
                    message.exchange,
                    "send",
                    **{
                        "messaging.message.id": props.get("message_id"),
                        "messaging.message.conversation_id": props.get("correlation_id"),
                        "messaging.rabbitmq.destination.routing_key": message.routing_key,
                        "orders.message_type": props.get("type"),
                    },
                ),
            )
            spans.append(event_span)
            carrier: dict[str, str] = {}
            inject(carrier, context=trace.set_span_in_context(event_span))
            out.append(with_traceparent(message, carrier.get(TRACEPARENT)))
        try:
            publish(out)
        except BaseException as exc:
            for event_span in spans:
                event_span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            raise
        finally:
            for event_span in spans:
                event_span.end()
