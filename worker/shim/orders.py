"""``/orders`` endpoints: place, read and cancel.

Each enqueues a command (or reads the cache) and answers; the worker decides.
``Prefer: wait=N`` waits for the worker's outcome through direct reply-to.
Handlers run on the event loop: Redis and RabbitMQ are asked without a
thread; only a PostgreSQL read (a cache miss) goes to the thread pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from handlers.orders import PAID_CANCELLABLE, UNPAID, Status
from schema.messages import CancelOrder, OutcomeResult, PlaceOrder
from worker.read_model import OrderViewData
from worker.redis_gate import RedisBusy
from worker.shim.auth import Principal
from worker.shim.context import PlaceCaller, ReadCaller, Shim, ShimDep
from worker.shim.errors import ApiError, ErrorBody
from worker.shim.idempotency import KEY_PATTERN, fingerprint, validate_key
from worker.shim.models import Accepted, CancelRequest, OrderHistory, OrderView, PlaceOrderRequest
from worker.shim.publisher import Envelope
from worker.shim.routing import StrictJsonRoute

router = APIRouter(tags=["orders"], route_class=StrictJsonRoute)

#: while waiting, how often the read model is polled for the order to leave ``pending``
POLL_SECONDS = 0.02
_PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*(\d{1,6})(?:$|[;,\s])")

_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
_RATE_HEADERS = {
    **_RETRY_AFTER,
    "RateLimit-Limit": {"schema": {"type": "string"}},
    "RateLimit-Remaining": {"schema": {"type": "string"}},
    "RateLimit-Reset": {"schema": {"type": "string"}},
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody} for c in codes}
    if 429 in out:
        out[429]["headers"] = _RATE_HEADERS
    if 503 in out:
        out[503]["headers"] = _RETRY_AFTER
    return out


IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", pattern=KEY_PATTERN, description="Same key and body → the same order.")
]
Prefer = Annotated[str | None, Header(max_length=200, description="`wait=N` (N ≤ 30): wait for the outcome.")]


def place_message_id(order_id: str, user: str) -> str:
    """AMQP ``message_id`` of a PlaceOrder sent through the shim: one per (order id, user).

    The same user sending the same order again is a duplicate the inbox drops;
    another user naming a taken order id sends a different message, which the
    worker refuses (and announces) instead of it vanishing as a duplicate.
    """
    return f"http-place-{order_id}-{hashlib.sha256(user.encode()).hexdigest()[:16]}"


def _taken() -> ApiError:
    # the same answer whoever owns the order: nothing about it (owner, message ids) is told
    return ApiError(409, "order_id_taken", "this order id is already taken; choose another (or leave it out)")


def _wait_seconds(s: Shim, prefer: str | None) -> int:
    match = _PREFER_WAIT.search(prefer or "")
    return min(int(match.group(1)), s.settings.shim.max_wait_seconds) if match else 0


async def _view(s: Shim, order_id: str) -> OrderViewData | None:
    try:
        return await s.cache.get(order_id)
    except sa_exc.SQLAlchemyError:
        raise ApiError(
            503, "database_unavailable", "orders cannot be read now; retry later", {"Retry-After": "5"}
        ) from None


async def _owned_view(s: Shim, principal: Principal, order_id: uuid.UUID) -> OrderViewData:
    view = await _view(s, str(order_id))
    if view is None or not principal.may_see(view["user_id"]):  # someone else's order: not found, not 403
        raise ApiError(404, "order_not_found", f"order {order_id} not found")
    return view


async def _settled_view(
    s: Shim, order_id: str, deadline: float, done: Callable[[OrderViewData], bool]
) -> OrderViewData | None:
    """Poll the read model until ``done(view)`` or the deadline; the last view seen.

    No free Redis connection ends the wait early instead of shedding: the
    command is published already, and a 503 would invite a retry that, without
    an Idempotency-Key, places the order twice.
    """
    view = None
    try:
        view = await _view(s, order_id)
        while (view is None or not done(view)) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
            view = await _view(s, order_id)
    except RedisBusy:
        pass
    return view


def _may_cancel(s: Shim, principal: Principal, view: OrderViewData) -> bool:
    """The worker's rule (handlers/cancel_order.py), told at once: an unpaid order, or a paid one that has not
    shipped by an admin, or by its owner within ``orders.customer_cancel_minutes`` of payment (refunded)."""
    status = Status(view["status"])
    if status in UNPAID:
        return True
    if status not in PAID_CANCELLABLE:
        return False
    if principal.is_admin:
        return True
    window = s.settings.orders.customer_cancel_minutes * 60
    paid_at = view.get("paid_at")
    return bool(window and paid_at and time.time() - datetime.fromisoformat(paid_at).timestamp() <= window)


def _accepted(order_id: str, status: str, headers: dict[str, str]) -> JSONResponse:
    url = f"/orders/{order_id}"
    body = Accepted(order_id=uuid.UUID(order_id), status=status, status_url=url)
    return JSONResponse(body.model_dump(mode="json"), 202, {**headers, "Location": url})


def _refusal(reply: dict[str, Any]) -> ApiError:
    if reply.get("error") == "not_found":
        return ApiError(404, "order_not_found", "order not found")
    if reply.get("error") == "order_id_taken":
        return _taken()
    return ApiError(409, str(reply.get("error") or "refused"), str(reply.get("message") or "refused"))


def _rejection(order_id: str, view: OrderViewData, headers: dict[str, str]) -> ApiError:
    """A placed order the worker rejected (unknown product, declined card, ...): the rejection, not a 201."""
    reason = view.get("reason") or "no reason given"
    return ApiError(
        422,
        "order_rejected",
        f"order {order_id} was rejected: {reason}",
        {**headers, "Location": f"/orders/{order_id}"},
        order_id=order_id,
    )


async def _enqueue(
    s: Shim, cmd: Envelope, prefer: str | None, response: Response
) -> tuple[dict[str, str], float | None, dict[str, Any] | None]:
    """Publish ``cmd``; with ``Prefer: wait`` also wait for the worker's reply.

    Returns the response headers, the wait's deadline (None when the caller
    did not ask to wait) and the reply (None when none came in time); a
    refusal is raised as its HTTP error.
    """
    wait = _wait_seconds(s, prefer)
    headers = dict(response.headers)
    if not wait:
        await s.publisher.send(cmd)
        return headers, None, None
    deadline = time.monotonic() + wait
    reply = await s.publisher.request(cmd, wait)
    headers["Preference-Applied"] = f"wait={wait}"
    if reply is not None and reply.get("result") == OutcomeResult.REFUSED:
        raise _refusal(reply)
    return headers, deadline, reply


@router.post(
    "/orders",
    status_code=202,
    response_model=Accepted,
    summary="Place an order",
    responses={
        201: {"model": OrderView, "description": "Placed (with `Prefer: wait`)."},
        422: {
            "model": ErrorBody,
            "description": "Invalid request (`validation_error`), or, with "
            "`Prefer: wait`, the order was rejected (`order_rejected`: the reason and `order_id`).",
        },
        **_errors(400, 401, 403, 409, 413, 415, 429, 503),
    },
)
async def place_order(
    body: PlaceOrderRequest,
    response: Response,
    s: ShimDep,
    principal: PlaceCaller,
    idempotency_key: IdempotencyKey = None,
    prefer: Prefer = None,
) -> Any:
    if body.user_id is not None and body.user_id != principal.user_id and not principal.is_admin:
        raise ApiError(403, "forbidden", "a user may place orders only for itself")
    user = body.user_id or principal.user_id
    key = validate_key(idempotency_key)
    order_id = body.order_id or (s.idempotency.derive("place", user, key) if key else uuid.uuid4())
    command = body.model_dump(mode="json", exclude_none=True) | {"user_id": user, "order_id": str(order_id)}
    PlaceOrder.model_validate_json(json.dumps(command))  # the worker's own check, at the edge too
    if body.order_id is not None:  # a chosen id may be someone else's: never accept an order for it
        existing = await _view(s, str(order_id))
        if existing is not None and existing["user_id"] != user:
            raise _taken()
    if key:
        await s.idempotency.claim("place", user, key, fingerprint(command))
    cmd = Envelope.on_route(PlaceOrder, place_message_id(str(order_id), user), command)
    headers, deadline, reply = await _enqueue(s, cmd, prefer, response)
    if deadline is None:
        return _accepted(str(order_id), Status.PENDING.value, headers)
    view = (
        None
        if reply is None
        else await _settled_view(s, str(order_id), deadline, lambda v: v["status"] != Status.PENDING)
    )
    if view is not None and view["user_id"] != user:
        raise _taken()
    if view is None:
        return _accepted(str(order_id), Status.PENDING.value, headers)
    if view["status"] == Status.REJECTED:
        raise _rejection(str(order_id), view, headers)
    return JSONResponse(OrderView.of(view).model_dump(mode="json"), 201, {**headers, "Location": f"/orders/{order_id}"})


@router.get(
    "/orders/{order_id}", response_model=OrderView, summary="Read an order", responses=_errors(401, 404, 422, 429, 503)
)
async def get_order(order_id: uuid.UUID, s: ShimDep, principal: ReadCaller) -> Any:
    return OrderView.of(await _owned_view(s, principal, order_id))


@router.get(
    "/orders/{order_id}/history",
    response_model=OrderHistory,
    summary="An order's whole story (admins)",
    responses=_errors(401, 404, 429, 503),
)
async def get_order_history(order_id: uuid.UUID, s: ShimDep, principal: ReadCaller) -> Any:
    """Transitions with the commands behind them, events and whether they were relayed, payment attempts,
    refusals: what ``orders show`` prints (without the dead-letter queue, which lives in RabbitMQ).
    For anyone but an admin the answer is 404, as for an order that does not exist."""
    from starlette.concurrency import run_in_threadpool

    from worker.history import order_story

    if not principal.is_admin:
        raise ApiError(404, "order_not_found", f"order {order_id} not found")
    try:
        story = await run_in_threadpool(order_story, s.engine, str(order_id))
    except sa_exc.SQLAlchemyError:
        raise ApiError(
            503, "database_unavailable", "orders cannot be read now; retry later", {"Retry-After": "5"}
        ) from None
    if story is None:
        raise ApiError(404, "order_not_found", f"order {order_id} not found")
    return story


@router.put(
    "/orders/{order_id}/cancel",
    status_code=202,
    response_model=Accepted,
    summary="Cancel an order",
    responses={
        200: {"model": OrderView, "description": "Cancelled (with `Prefer: wait`)."},
        **_errors(400, 401, 404, 409, 413, 415, 422, 429, 503),
    },
)
async def cancel_order(
    order_id: uuid.UUID,
    response: Response,
    s: ShimDep,
    principal: PlaceCaller,
    body: Annotated[CancelRequest | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
    prefer: Prefer = None,
) -> Any:
    view = await _owned_view(s, principal, order_id)
    if view["status"] == "cancelled":
        raise ApiError(409, "already_cancelled", f"order {order_id} is already cancelled")
    if not _may_cancel(s, principal, view):
        raise ApiError(409, "not_cancellable", f"order {order_id} is {view['status']} and can no longer be cancelled")
    key = validate_key(idempotency_key)
    message_id = (
        f"http-cancel-{s.idempotency.derive('cancel', principal.user_id, f'{order_id}:{key}') if key else uuid.uuid4()}"
    )
    command: dict[str, Any] = {
        "order_id": str(order_id),
        "requested_by": {"user_id": principal.user_id, "roles": list(principal.roles)},
    }
    if body is not None and body.reason:
        command["reason"] = body.reason
    cmd = Envelope.on_route(CancelOrder, message_id, command)
    headers, deadline, reply = await _enqueue(s, cmd, prefer, response)
    if deadline is None or reply is None:
        return _accepted(str(order_id), "cancel_requested", headers)
    settled = await _settled_view(s, str(order_id), deadline, lambda v: v["status"] == reply.get("status"))
    return JSONResponse(OrderView.of(settled or view).model_dump(mode="json"), 200, headers)
