"""The FastAPI application factory of the HTTP shim.

``create_app(settings)`` wires the process's resources (nothing connects
until first use, so it is safe before uvicorn forks its workers);
``from_environment`` is the factory uvicorn imports when it runs several
worker processes.  Endpoint handlers are ``async``: RabbitMQ (pika's asyncio
adapter, one pipelined confirmed channel per process) and Redis (redis-py's
asyncio client) are asked on the event loop; PostgreSQL reads, the payment
SDKs and webhook verification run in Starlette's thread pool.

Overload is shed, not queued: a process working on
``shim.max_concurrent_requests`` requests, or one whose Redis pool had no
free connection in time (:class:`~worker.redis_gate.RedisBusy`), answers
503 ``overloaded`` with ``Retry-After``, counted in
``orders_shim_shed_total{reason}``.  Rate limits stay on meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import re
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from handlers.payments import build_gateways
from schema import asyncapi
from worker import db, tracing
from worker.read_model import AsyncOrderCache, make_async_redis
from worker.redis_gate import RedisBusy, RedisGate
from worker.settings import Settings, load_settings
from worker.shim import errors
from worker.shim.amqp import AsyncChannel
from worker.shim.auth import Authenticator
from worker.shim.console.routes import DeadLetterIndexer
from worker.shim.console.routes import router as console_router
from worker.shim.context import Shim
from worker.shim.idempotency import IdempotencyStore
from worker.shim.metrics import ShimMetrics
from worker.shim.ops import router as ops_router
from worker.shim.orders import router as orders_router
from worker.shim.publisher import CommandPublisher
from worker.shim.ratelimit import RateLimiter

Scope = dict[str, Any]

#: seconds a shed request is told to wait (Retry-After) before trying again
SHED_RETRY_AFTER = 1
#: never shed for concurrency: probes and scrapes must see an overloaded process
UNSHED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: the console's and the API documentation's files, shipped in the package (no CDN: worker/shim/static/README.md)
STATIC = Path(__file__).with_name("static")


def shed(metrics: ShimMetrics, reason: str) -> JSONResponse:
    """503 ``overloaded`` with Retry-After, counted by reason (``concurrency``, ``redis_pool``)."""
    metrics.shed.labels(reason).inc()
    return errors.error_response(
        503,
        "overloaded",
        f"the service is overloaded; retry after {SHED_RETRY_AFTER} s",
        {"Retry-After": str(SHED_RETRY_AFTER)},
    )


class ClientGone(Exception):
    """The client disconnected before its whole body arrived."""


class EdgeMiddleware:
    """Refuses bodies over the size limit (413) before any parsing, and bodies that do not
    arrive in time (408, connection closed: a client trickling bytes must not hold a
    connection and a buffer for ever); sheds requests beyond the concurrency limit (503);
    times every request."""

    def __init__(self, app: Any, max_body: int, body_timeout: float, metrics: ShimMetrics, max_concurrent: int) -> None:
        self.app, self.max_body, self.body_timeout, self.metrics = app, max_body, body_timeout, metrics
        self.max_concurrent, self.in_flight = max_concurrent, 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                async with asyncio.timeout(self.body_timeout):
                    body = await self._read_body(scope, receive)
            except TimeoutError:
                return await _refuse(
                    send_status, 408, "request_timeout", f"request body not received within {self.body_timeout:g} s"
                )
            except ClientGone:
                status = 499  # nobody to answer; the part of a body that came must never be acted on
                return
            if body is None:
                return await _refuse(
                    send_status, 413, "payload_too_large", f"request body larger than {self.max_body} bytes"
                )
            if self.in_flight >= self.max_concurrent and scope["path"] not in UNSHED_PATHS:
                return await shed(self.metrics, "concurrency")(scope, receive, send_status)
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if replayed:
                    return await receive()  # type: ignore[no-any-return]
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            self.in_flight += 1
            try:
                await self.app(scope, replay, send_status)
            finally:
                self.in_flight -= 1
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _read_body(self, scope: Scope, receive: Any) -> bytes | None:
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_body):
                return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _refuse(send: Any, status: int, code: str, message: str) -> None:
    """Answer before the app saw the request, and close the connection (its body is left unread)."""
    body = errors.error_json(code, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def build_shim(settings: Settings) -> Shim:
    """The process's resources; connections open on first use."""
    cfg = settings.shim
    metrics = ShimMetrics()
    engine = db.make_engine(settings.database)
    client = make_async_redis(settings.redis, cfg.redis_pool_size, cfg.redis_pool_timeout_seconds)
    gate = RedisGate("the shim")  # one Redis: a failure seen by any user of it spares the others
    channel = AsyncChannel(settings.rabbitmq.url.get_secret_value(), settings.rabbitmq.heartbeat_seconds)
    limits: dict[str, tuple[int | None, int]] = {
        "place": (cfg.place_rate_per_minute, cfg.place_rate_per_minute_per_address),
        "read": (cfg.read_rate_per_minute, cfg.read_rate_per_minute_per_address),
        "webhook": (None, cfg.webhook_rate_per_minute_per_address),  # unauthenticated: per address only
    }
    return Shim(
        settings=settings,
        engine=engine,
        redis=client,
        gate=gate,
        cache=AsyncOrderCache(engine, client, settings.redis.cache_ttl_seconds, metrics=metrics, gate=gate),
        publisher=CommandPublisher(channel, cfg.publish_timeout_seconds, metrics, settings.rabbitmq.user),
        gateways=build_gateways(settings),
        auth=Authenticator(cfg),
        limiter=RateLimiter(client, limits, metrics, gate, cfg.rate_limit_share_of),
        idempotency=IdempotencyStore(client, cfg.idempotency_ttl_seconds, gate, cfg.id_secret.get_secret_value()),
        metrics=metrics,
    )


def create_app(settings: Settings) -> FastAPI:
    """The shim's FastAPI application for ``settings``."""
    shim = build_shim(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        tracing.flush()
        shim.publisher.close()
        await shim.redis.aclose()
        shim.engine.dispose()

    app = FastAPI(
        title="Order service HTTP API",
        version="1.0.0",
        lifespan=lifespan,
        description="Places, reads and cancels orders by enqueueing commands; takes payment webhooks.",
        docs_url=None,  # FastAPI's own pages load their scripts from a CDN: served from the package below
        redoc_url=None,
    )
    app.state.shim = shim
    app.state.console_indexer = DeadLetterIndexer(settings, shim.engine)
    errors.install(app)
    _documentation(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RedisBusy)
    async def _redis_busy(_request: Request, _exc: RedisBusy) -> JSONResponse:
        return shed(shim.metrics, "redis_pool")  # local overload: the gate stays open for everyone else

    app.include_router(orders_router)
    app.include_router(ops_router)
    app.include_router(console_router)
    app.add_middleware(
        EdgeMiddleware,
        max_body=settings.shim.max_body_bytes,
        body_timeout=settings.shim.body_timeout_seconds,
        metrics=shim.metrics,
        max_concurrent=settings.shim.max_concurrent_requests,
    )
    if tracing.setup(settings.tracing, "orders-shim"):  # off unless configured (docs/operations.md, Tracing)
        tracing.instrument_app(app, settings.tracing.trust_incoming)
    return app


def _documentation(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their scripts, styles and icons from ``/static``: they render
    on a machine or network without internet access; and ``/asyncapi.json``, the message contract.

    Each page also gets a Content-Security-Policy that lets it reach this origin only: Redoc's sidebar
    would otherwise fetch its attribution logo from cdn.redoc.ly (it hides the image when that fails).
    FastAPI's pages start Swagger UI with an inline script and Redoc styles itself inline, so the policy
    names that one script by its hash and allows inline styles.
    """
    openapi = app.openapi_url or "/openapi.json"
    title = f"{app.title} - docs"
    swagger = get_swagger_ui_html(
        openapi_url=openapi,
        title=title,
        swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger-ui/swagger-ui.css",
        swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        oauth2_redirect_url="/docs/oauth2-redirect",
        # no badge fetched from validator.swagger.io
        swagger_ui_parameters={"validatorUrl": None},
    )
    redoc = get_redoc_html(
        openapi_url=openapi,
        title=title,
        redoc_js_url="/static/redoc/redoc.standalone.js",
        redoc_favicon_url="/static/swagger-ui/favicon-32x32.png",
        with_google_fonts=False,
    )
    redirect = get_swagger_ui_oauth2_redirect_html()
    pages = {"/docs": swagger, "/redoc": redoc, "/docs/oauth2-redirect": redirect}
    for path, html in pages.items():
        policy = _same_origin_policy(bytes(html.body))
        app.add_api_route(path, _fixed(bytes(html.body), policy), include_in_schema=False, methods=["GET"])
    app.add_api_route(ASYNCAPI_PATH, _asyncapi, include_in_schema=False, methods=["GET"])


#: the message contract (AsyncAPI 3.0), unauthenticated like /openapi.json
ASYNCAPI_PATH = "/asyncapi.json"


@functools.cache
def _asyncapi_document() -> bytes:
    """Generated once per process, on first request: the contract does not change while the process runs."""
    return asyncapi.as_json()


async def _asyncapi() -> Response:
    """The AsyncAPI document of the message contract (``schema/asyncapi.py``; ``docs/asyncapi.yaml`` as JSON)."""
    return Response(_asyncapi_document(), media_type="application/json")


def _same_origin_policy(html: bytes) -> str:
    """A CSP for a documentation page: everything from this origin, its inline scripts by hash."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in re.findall(rb"<script>(.*?)</script>", html, re.S)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def _fixed(body: bytes, policy: str) -> Any:
    async def serve() -> HTMLResponse:
        return HTMLResponse(body, headers={"Content-Security-Policy": policy, "X-Frame-Options": "DENY"})

    return serve


def from_environment() -> FastAPI:
    """uvicorn ``--factory`` entry point: settings from ``ORDERS_CONFIG`` and the environment."""
    from worker import logs

    settings = load_settings()
    logs.configure(settings.logging.level, settings.logging.format)
    return create_app(settings)
