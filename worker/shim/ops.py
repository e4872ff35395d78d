"""Health, readiness, metrics and the payment webhook endpoint."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from worker.redis_gate import RedisBusy
from worker.shim.context import ShimDep, client_address, rate_limit
from worker.shim.errors import ApiError, ErrorBody
from worker.shim.models import Health, RateLimitState, Readiness, WebhookAccepted
from worker.shim.routing import StrictJsonRoute
from worker.shim.webhook import to_publish

#: the webhook declares no body model (it reads its signed bytes), so the strict route leaves it alone
router = APIRouter(route_class=StrictJsonRoute)


@router.get("/healthz", response_model=Health, tags=["operations"], summary="The process is up")
async def healthz() -> Health:
    return Health()


async def _check(probe: Any) -> str:
    try:
        await probe()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the kind is reported
        return f"unavailable: {type(exc).__name__}"


@router.get(
    "/readyz",
    response_model=Readiness,
    tags=["operations"],
    summary="Dependencies reachable",
    responses={503: {"model": Readiness, "description": "PostgreSQL or RabbitMQ is unreachable."}},
)
async def readyz(s: ShimDep) -> Any:
    """Ready when PostgreSQL and RabbitMQ answer.  Redis is reported, never required: without it
    reads come from PostgreSQL and rate limits are enforced in-process (``rate_limits``)."""

    def select_one() -> None:
        with s.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def postgres() -> None:
        await run_in_threadpool(select_one)

    checks = {
        "postgresql": await _check(postgres),
        "rabbitmq": await _check(s.publisher.ping),
        "redis": await _redis(s),
    }
    ready = checks["postgresql"] == "ok" and checks["rabbitmq"] == "ok"
    body = Readiness(
        status="ready" if ready else "not_ready",
        checks=checks,  # type: ignore[arg-type]
        rate_limits=RateLimitState(mode=s.limiter.mode, share_of=s.limiter.local.processes),
    )
    if ready:
        return body
    failing = ", ".join(k for k in ("postgresql", "rabbitmq") if checks[k] != "ok")
    body = body.model_copy(update={"error": "not_ready", "message": f"unreachable: {failing}"})
    return JSONResponse(body.model_dump(mode="json"), 503, {"Retry-After": "5"})


async def _redis(s: Any) -> str:
    """Ping Redis and tell the gate: a probe also notices an outage, or its end, with no traffic."""
    try:
        await s.redis.ping()
    except RedisBusy:
        return "busy: every connection in use"
    except redis.RedisError as exc:
        s.gate.failed(exc)
        return f"unavailable: {type(exc).__name__}"
    s.gate.succeeded()
    return "ok"


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(s: ShimDep) -> Response:
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/orders/payment-confirmation",
    response_model=WebhookAccepted,
    tags=["payments"],
    summary="Payment provider webhook (Stripe, PayPal, internal HMAC)",
    responses={
        400: {"model": ErrorBody},
        413: {"model": ErrorBody},
        422: {"model": ErrorBody},
        429: {"model": ErrorBody},
        503: {"model": ErrorBody},
    },
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}},
)
async def payment_confirmation(request: Request, response: Response, s: ShimDep) -> WebhookAccepted:
    # counted per client address before anything is verified: the sender is not known yet
    await rate_limit(s, "webhook", None, client_address(request), response)
    # the raw bytes are what the provider signed: never re-serialise before verifying
    body = await request.body()
    headers = dict(request.headers)
    try:
        event_id, command = await run_in_threadpool(to_publish, s.settings.shim, s.gateways, body, headers, s.engine)
    except ApiError as exc:
        if exc.code == "overloaded":  # every certificate fetch slot in use: shed, and counted as such
            s.metrics.shed.labels("certificate_fetch").inc()
        raise
    if command is not None:
        await s.publisher.send(command)
    return WebhookAccepted(enqueued=command is not None, event_id=event_id)
