"""Routes whose JSON request bodies refuse duplicate keys.

FastAPI reads a route's JSON body with ``json.loads``, which keeps the last
of two equal keys: ``{"quantity": 1, "quantity": 9999}`` was charged for
9,999.  :class:`StrictJsonRoute` parses the body once, with
:func:`schema.jsonstrict.loads_no_duplicates`, before FastAPI does, and
answers a repeated key as a validation error (422 ``validation_error``,
``body.items.0: duplicate key 'quantity'``).  The parsed value is what
FastAPI then validates, so a body is still parsed only once.  Malformed JSON
answers 422 saying where (``body: invalid JSON at line 1, column 52:
Expecting ',' delimiter``; FastAPI's own answer was a character offset,
``body.51: JSON decode error``), and a body that is not declared JSON (a
form, ``text/plain``, no ``Content-Type`` at all) answers 415
``unsupported_media_type`` naming ``application/json``: FastAPI would read
it as a string and answer that the body is not an object.  Routes that
declare no body model (the payment webhook reads its raw, signed bytes) are
not touched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from schema.jsonstrict import DuplicateKeyError, loads_no_duplicates
from worker.shim.errors import ApiError


def _declares_json(content_type: str | None) -> bool:
    """The body is JSON as FastAPI reads it: ``application/json`` or ``application/*+json``."""
    if not content_type:
        return False  # FastAPI's strict content type: no header, no JSON parsing
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class StrictJsonRequest(Request):
    """A request whose ``json()`` refuses duplicate keys."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_no_duplicates(await self.body())
        return self._json


def _invalid_json(exc: ValueError) -> RequestValidationError:
    if isinstance(exc, json.JSONDecodeError):
        where = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    else:  # UnicodeDecodeError: json.loads takes UTF-8, -16 or -32 bytes
        where = "invalid JSON: the body is not UTF-8 text"
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": where, "input": {}}])


def _unsupported(content_type: str | None) -> ApiError:
    got = f"Content-Type {content_type.partition(';')[0].strip()}" if content_type else "no Content-Type"
    return ApiError(
        415,
        "unsupported_media_type",
        f"the request body must be JSON sent as Content-Type: application/json (got {got})",
    )


class StrictJsonRoute(APIRoute):
    """An ``APIRoute`` for JSON bodies: 415 to any other kind, 422 to malformed JSON or a key named twice."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request) -> Response:
            request = StrictJsonRequest(request.scope, request.receive)
            content_type = request.headers.get("content-type")
            if await request.body():
                if not _declares_json(content_type):
                    raise _unsupported(content_type)
                try:
                    await request.json()
                except DuplicateKeyError as exc:
                    raise RequestValidationError(
                        [
                            {
                                "type": "duplicate_key",
                                "loc": ("body", *exc.path),
                                "msg": f"duplicate key {exc.key!r}",
                                "input": exc.key,
                            }
                        ]
                    ) from None
                except ValueError as exc:
                    raise _invalid_json(exc) from None
            return await handler(request)

        return strict
