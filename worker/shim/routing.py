"""Routes whose JSON request bodies refuse duplicate keys.

FastAPI reads a route's JSON body with ``json.loads``, which keeps the last
of two equal keys: ``{"quantity": 1, "quantity": 9999}`` was charged for
9,999.  :class:`StrictJsonRoute` parses the body once, with
:func:`schema.jsonstrict.loads_no_duplicates`, before FastAPI does, and
answers a repeated key as a validation error (422 ``validation_error``,
``body.items.0: duplicate key 'quantity'``).  The parsed value is what
FastAPI then validates, so a body is still parsed only once.  Malformed JSON
is left to FastAPI's own error path.  Routes that declare no body model
(the payment webhook reads its raw, signed bytes) are not touched.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from schema.jsonstrict import DuplicateKeyError, loads_no_duplicates


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


class StrictJsonRoute(APIRoute):
    """An ``APIRoute`` that answers 422 to a JSON body naming a key twice."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request) -> Response:
            request = StrictJsonRequest(request.scope, request.receive)
            if _declares_json(request.headers.get("content-type")) and await request.body():
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
                except ValueError:
                    pass  # malformed JSON: FastAPI parses again and answers as it always does
            return await handler(request)

        return strict
