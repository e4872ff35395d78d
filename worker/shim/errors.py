"""Every error the shim answers: JSON ``{"error": code, "message": ...}``.

Codes are stable (clients branch on them); messages are for humans.
Validation errors name the field (``body.items.0.quantity: ...``) and list
each problem in ``fields``.  Unexpected exceptions are logged with their
traceback and answered as a bare 500: no stack trace ever leaves the process.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger("worker.shim")


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str
    message: str
    fields: list[FieldError] | None = None
    #: the order the error is about, where one was created (e.g. ``order_rejected``)
    order_id: str | None = None


class ApiError(Exception):
    """Raised by handlers and dependencies; becomes an :class:`ErrorBody` response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        fields: list[FieldError] | None = None,
        order_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.fields = fields
        self.order_id = order_id


def error_json(code: str, message: str) -> bytes:
    """An :class:`ErrorBody` as bytes, for answers written below FastAPI (middleware, protocol)."""
    return ErrorBody(error=code, message=message).model_dump_json(exclude_none=True).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    fields: list[FieldError] | None = None,
    order_id: str | None = None,
) -> JSONResponse:
    body = ErrorBody(error=code, message=message, fields=fields, order_id=order_id).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


def field_errors(errors: Any) -> list[FieldError]:
    """Pydantic / FastAPI error dicts → one :class:`FieldError` per problem, named by its path."""
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("function-after[_one_item_form()]",)]
        # pydantic reports the discriminated-union member as a path step; drop it for readers
        loc = [p for p in loc if not p.startswith(("tagged-union[", "function-"))]
        msg = str(err.get("msg", "invalid value"))
        out.append(FieldError(field=".".join(loc) or "body", message=msg[:300]))
    return out


#: one short code per HTTP status that Starlette raises on its own (404 route, 405 method)
_STATUS_CODES = {
    400: "malformed_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into an :class:`ErrorBody`."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.fields, exc.order_id)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = field_errors(exc.errors())
        message = "; ".join(f"{f.field}: {f.message}" for f in fields[:5])
        return error_response(422, "validation_error", message or "invalid request", fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", path=request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal error; the request may be retried")
