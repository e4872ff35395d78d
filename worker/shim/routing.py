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
``body.51: JSON decode error``), JSON nested too deeply for the parser
(thousands of ``[``) answers 422 and logs one line (it was a 500 with a
``RecursionError`` traceback), and a body that is not declared as
``application/json`` (a form, ``text/plain``, ``application/evil+json``, a
charset other than UTF-8, no ``Content-Type`` at all) answers 415
``unsupported_media_type`` naming ``application/json`` and echoing nothing of
the request: FastAPI would read some of these as a string and answer that
the body is not an object, and take the ``+json`` kinds and any charset.  Routes that
declare no body model (the payment webhook reads its raw, signed bytes) are
not touched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from schema.jsonstrict import DuplicateKeyError, TooDeeplyNested, loads_no_duplicates
from worker.shim.errors import ApiError

log = structlog.get_logger("worker.shim")


def _declares_json(content_type: str | None) -> bool:
    """``application/json``, with no parameter but ``charset=utf-8`` (any case, quoted or not).

    JSON is UTF-8 (RFC 8259 §8.1); a client that says otherwise, or names
    another kind, is told so rather than guessed at.
    """
    if not content_type:
        return False
    kind, *parameters = content_type.split(";")
    if kind.strip().lower() != "application/json":
        return False
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() != "charset" or value.strip().strip('"').lower() != "utf-8":
            return False
    return True


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


def _unsupported() -> ApiError:
    # nothing of the request is echoed: what a client sent is not ours to repeat
    return ApiError(
        415,
        "unsupported_media_type",
        "the request body must be JSON sent as Content-Type: application/json (charset utf-8, or none)",
    )


def _too_deep(request: Request) -> RequestValidationError:
    log.warning("request body refused: JSON nested too deeply", path=request.url.path)  # one line, no traceback
    return RequestValidationError(
        [{"type": "json_invalid", "loc": ("body",), "msg": "invalid JSON: nested too deeply", "input": {}}]
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
                    raise _unsupported()
                try:
                    await request.json()
                except TooDeeplyNested:
                    raise _too_deep(request) from None
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
