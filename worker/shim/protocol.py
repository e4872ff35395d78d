"""uvicorn's httptools protocol with the two limits it lacks: the size of a request head and
the time it may take to arrive.

uvicorn parses HTTP/1.1 with httptools (installed with ``uvicorn[standard]``,
picked by ``http="auto"``).  Unlike its h11 protocol, which refuses a head
over ``h11_max_incomplete_event_size``, the httptools one buffers a head of
any size (an 8 MB header was accepted) and has no deadline for it: a
connection that sends nothing, or a head one byte at a time, is held until
the client leaves.  h11 closes the first hole but not the second, and parses
more slowly; this subclass keeps httptools and adds both:

- a head (request line and headers) over ``max_head_bytes`` answers 431 and
  the connection closes, as soon as that many bytes arrived without the head
  ending, so a client can make the process hold at most one read beyond the
  limit;
- a head not complete within ``head_timeout`` seconds of the connection's
  start or of the request's first byte answers 408 and the connection closes
  (a connection that sent nothing is closed without an answer).

Bodies have their own deadline in :class:`worker.shim.app.EdgeMiddleware`.
Answers are written here, below the app, in the shim's error format.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from worker.shim.errors import error_json

#: bytes a header line costs beyond its name and value (": " and CRLF)
_LINE_OVERHEAD = 4


class EdgeHttpToolsProtocol(HttpToolsProtocol):
    """Pass as ``uvicorn.Config(http=functools.partial(EdgeHttpToolsProtocol, max_head_bytes=..., head_timeout=...))``."""

    def __init__(self, *args: Any, max_head_bytes: int, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes, self.head_timeout = max_head_bytes, head_timeout
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0  # bytes received, in whole reads, since the head began
        self._read_began_in_head = False  # the read being parsed started with the head still to come
        self._head_counted_whole = True  # the head began with a read, so _head_bytes counts all of it
        self._head_deadline: asyncio.TimerHandle | None = None
        self._refused = False  # answered 431/408: the rest of the connection's bytes are ignored

    # -- connection events ---------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        counted = self._read_began_in_head = self._in_head
        if counted:
            self._head_bytes += len(data)
        super().data_received(data)
        # still in the head after this read: every byte counted is a head byte
        if counted and self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(431, "headers_too_large", f"request head larger than {self.max_head_bytes} bytes")

    # -- parser callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_counted_whole = self._read_began_in_head  # not so for a pipelined head begun mid-read
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._disarm_head_deadline()
        counted, self._in_head, self._head_bytes = self._head_bytes, False, 0
        # the reads counted hold the whole head: only a larger count (or a head begun mid-read) needs measuring
        if (counted > self.max_head_bytes or not self._head_counted_whole) and self._head_size() > self.max_head_bytes:
            return self._refuse(431, "headers_too_large", f"request head larger than {self.max_head_bytes} bytes")
        super().on_headers_complete()

    def _head_size(self) -> int:
        return len(self.url) + sum([len(name) + len(value) + _LINE_OVERHEAD for name, value in self.headers])

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        if not self._refused:
            super().on_message_complete()

    # -- the head's deadline -----------------------------------------------------------

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._refused or self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head waits (reading paused) while the previous answer is written: look again later
            self._arm_head_deadline()
            return
        if self._head_bytes == 0:
            self.transport.close()  # opened and never used: nothing to answer
            return
        self._refuse(408, "request_timeout", f"request head not received within {self.head_timeout:g} s")

    # -- refusing ------------------------------------------------------------------------

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` and close; a response still being sent for an earlier request ends the connection instead."""
        self._refused = True
        self._disarm_head_deadline()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # uvicorn closes once that response is out
            self.flow.pause_reading()
            return
        body = error_json(code, message)
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: ",
                    str(len(body)).encode(),
                    b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()
