"""What every request handler needs, built once per process, and the auth dependencies.

:class:`Shim` holds the process's resources (engine, Redis, cache, channel
publisher, gateways, limiter); ``create_app`` builds it at start-up and stores it
on ``app.state``.  The dependencies authenticate the caller and apply the
rate limit of the route's kind (``place`` for writes, ``read`` for reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from handlers.payments.base import PaymentGateway
from worker.read_model import AsyncOrderCache
from worker.redis_gate import RedisGate
from worker.settings import Settings
from worker.shim.auth import Authenticator, Principal
from worker.shim.errors import ApiError
from worker.shim.idempotency import IdempotencyStore
from worker.shim.metrics import ShimMetrics
from worker.shim.publisher import CommandPublisher
from worker.shim.ratelimit import RateLimiter


@dataclass
class Shim:
    settings: Settings
    engine: Engine
    redis: Any
    #: whether Redis is usable now; shared by the cache, the limiter and the idempotency store
    gate: RedisGate
    cache: AsyncOrderCache
    publisher: CommandPublisher
    gateways: Mapping[str, PaymentGateway]
    auth: Authenticator
    limiter: RateLimiter
    idempotency: IdempotencyStore
    metrics: ShimMetrics


async def shim(request: Request) -> Shim:
    # async: a plain lookup must not cost a hop through the thread pool
    return request.app.state.shim  # type: ignore[no-any-return]


ShimDep = Annotated[Shim, Depends(shim)]

#: documents the scheme in OpenAPI; errors are ours (auto_error off), not FastAPI's 403
_bearer = HTTPBearer(auto_error=False, description="JWT with `sub` and `roles` (`user`, `admin`).")


async def authenticated(
    request: Request, s: ShimDep, _creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    # async: verifying a JWT is CPU only; no thread pool hop
    return s.auth.principal(request.headers.get("authorization"))


def client_address(request: Request) -> str:
    """The client's address (the peer's, or the one a trusted proxy names: see ``shim.trusted_proxies``)."""
    return request.client.host if request.client else "unknown"


async def rate_limit(s: Shim, kind: str, user: str | None, address: str, response: Response) -> None:
    """Count one request of ``kind``; 429 with Retry-After when a limit is spent, else its RateLimit headers.

    In Redis, or this process's share while Redis is unreachable; RedisBusy sheds (see app).
    """
    decision = await s.limiter.check(kind, user, address)
    if not decision.allowed:
        s.metrics.rate_limited.labels(kind).inc()
        raise ApiError(
            429,
            "rate_limited",
            f"too many {kind} requests; retry after {decision.headers()['Retry-After']} s",
            decision.headers(),
        )
    response.headers.update(decision.headers())


def _limited(kind: str) -> Any:
    async def dependency(
        request: Request, response: Response, s: ShimDep, principal: Annotated[Principal, Depends(authenticated)]
    ) -> Principal:
        await rate_limit(s, kind, principal.user_id, client_address(request), response)
        return principal

    return dependency


PlaceCaller = Annotated[Principal, Depends(_limited("place"))]
ReadCaller = Annotated[Principal, Depends(_limited("read"))]
