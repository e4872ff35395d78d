"""The pipelined confirmed publisher of the relay: many messages in flight, one wait for all confirms.

Under a resource alarm (memory or disk) RabbitMQ stops reading a publishing
connection and says so (``connection.blocked``).  The batch written so far
then waits in socket buffers, and the broker reads and routes all of it once
the alarm clears, whether or not this connection is still there.  So the
publisher waits the alarm out: no confirm timeout and no blocked-connection
timeout while blocked (giving up would leave that batch behind in the
broker's buffers, and the relay's next session would publish it a second
time).  It still stops at once when asked (``stop``) and still fails when the
broker is gone (heartbeats, a closed socket).  A publisher closed while blocked
resets its connection (TCP RST), so the broker drops what it held unread
instead of routing it once the alarm clears.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import structlog
from pika.spec import Basic

from worker.errors import ConnectionLost, PublishNotConfirmed, StopRequested
from worker.rabbit.connection import PIKA_ERRORS, NodeRotation, Outgoing, basic_properties, lost

log = structlog.get_logger("worker.rabbit.publisher")

#: seconds between two calls of ``while_blocked`` during a resource alarm
BLOCKED_TICK = 10.0


class _HeldWritesConnection(pika.SelectConnection):
    """A ``SelectConnection`` that can hold its outgoing bytes and write them at once.

    pika writes every frame as a buffer of its own and sends each with a
    system call of its own: three per message (method, header, body).
    Inside :meth:`held_writes` the frames of a whole batch are joined and
    handed to the transport as one buffer, so a batch of 500 messages costs a
    few ``send`` calls instead of 1,500, on both ends of the socket.
    """

    _held: list[bytes] | None = None

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        else:
            super()._adapter_emit_data(data)

    @contextlib.contextmanager
    def held_writes(self) -> Iterator[None]:
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            if held and self._transport is not None:
                super()._adapter_emit_data(b"".join(held))


class PipelinedPublisher:
    """Publishes a batch without waiting per message, then waits for all confirms.

    Built on ``SelectConnection`` and its I/O loop, driven from the caller's
    thread; the confirms of one batch usually arrive as a few ``multiple``
    acks.  While the broker blocks the connection (a resource alarm) the wait
    for confirms has no time limit; ``stop`` ends it (:class:`StopRequested`).
    """

    def __init__(
        self,
        url: str,
        heartbeat: int = 30,
        stop: threading.Event | None = None,
        while_blocked: Callable[[], None] | None = None,
    ) -> None:
        self._nodes = NodeRotation(url, heartbeat, wait_out_alarms=True)
        self._stop = stop
        #: called every BLOCKED_TICK seconds while blocked (the relay keeps its round's transaction alive)
        self._while_blocked = while_blocked
        #: since when the broker blocks this connection (``connection.blocked``), None while it does not
        self._blocked_since: float | None = None
        self._conn: _HeldWritesConnection | None = None
        self._channel: Any = None
        self._ready = False
        self._error: str | None = None
        self._next_tag = 0
        self._unconfirmed: collections.deque[int] = collections.deque()
        self._nacked = 0

    def connect(self, timeout: float = 10) -> PipelinedPublisher:
        self._conn = _HeldWritesConnection(
            self._nodes.next(),  # after a failed or lost connection, the next attempt goes to another node
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_failed,
            on_close_callback=self._on_failed,
        )
        self._conn.add_on_connection_blocked_callback(self._on_blocked)
        self._conn.add_on_connection_unblocked_callback(self._on_unblocked)
        self._blocked_since = None
        # driven by poll() from this thread, as BlockingConnection drives it
        self._conn.ioloop.activate_poller()
        self._run_until(lambda: self._ready, timeout, "connecting")
        return self

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_failed)
        channel.confirm_delivery(self._on_confirm, callback=lambda _f: setattr(self, "_ready", True))

    def _on_failed(self, *args: Any) -> None:
        self._error = repr(args[-1]) if args else "closed"
        self._ready = False

    def _on_blocked(self, _conn: Any, frame: Any) -> None:
        if self._blocked_since is None:
            self._blocked_since = time.monotonic()
            reason = getattr(frame.method, "reason", "")
            log.warning(
                "broker blocks publishing, waiting for the alarm to clear",
                reason=reason,
                unconfirmed=len(self._unconfirmed),
            )

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        if self._blocked_since is not None:
            log.info("broker publishing again", blocked_seconds=round(time.monotonic() - self._blocked_since, 1))
        self._blocked_since = None

    @property
    def blocked(self) -> bool:
        """Whether the broker blocks this connection now (a resource alarm)."""
        return self._blocked_since is not None

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if method.multiple:  # tags are sequential: drop everything up to this one
            before = len(self._unconfirmed)
            while self._unconfirmed and self._unconfirmed[0] <= method.delivery_tag:
                self._unconfirmed.popleft()
            count = before - len(self._unconfirmed)
        else:
            count = 1
            try:
                self._unconfirmed.remove(method.delivery_tag)
            except ValueError:
                count = 0
        if isinstance(method, Basic.Nack):
            self._nacked += count

    def _run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        assert self._conn is not None
        deadline = time.monotonic() + timeout
        ticked = time.monotonic()
        ioloop = self._conn.ioloop
        while not done():
            if self._error is not None:
                raise ConnectionLost(f"{what}: {self._error}")
            if self._blocked_since is not None:
                # a resource alarm: what was written waits in the broker's buffers and is routed once the
                # alarm clears; giving up now would have it published twice (see the module's docstring)
                if self._stop is not None and self._stop.is_set():
                    raise StopRequested(f"{what}: stopped while the broker blocks publishing")
                deadline = time.monotonic() + timeout  # the timeout counts from the end of the alarm
                if self._while_blocked is not None and time.monotonic() - ticked >= BLOCKED_TICK:
                    ticked = time.monotonic()
                    self._while_blocked()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishNotConfirmed(f"{what}: no answer within {timeout}s")
            timer = ioloop.call_later(min(remaining, 0.5), lambda: None)  # bounds the poll
            try:
                ioloop.poll()
                ioloop.process_timeouts()
            except PIKA_ERRORS as exc:
                raise lost(exc) from exc
            finally:
                ioloop.remove_timeout(timer)

    def publish_batch(self, messages: list[Outgoing], timeout: float = 30) -> None:
        """Publish all, then block until every one is confirmed; raise otherwise.

        ``timeout`` bounds the wait for confirms while the broker reads; while it
        blocks the connection the wait lasts until the alarm clears, ``stop`` is
        set (:class:`StopRequested`) or the connection is lost."""
        if not self._ready or self._channel is None:
            raise ConnectionLost(self._error or "publisher not connected")
        self._nacked = 0
        assert self._conn is not None
        if self._blocked_since is not None:  # still blocked after the last batch: add nothing to its buffers
            self._run_until(lambda: self._blocked_since is None, timeout, "waiting for the alarm to clear")
        try:
            with self._conn.held_writes():
                for m in messages:
                    self._channel.basic_publish(m.exchange, m.routing_key, m.body, basic_properties(m.properties))
                    self._next_tag += 1
                    self._unconfirmed.append(self._next_tag)
        except PIKA_ERRORS as exc:
            raise lost(exc) from exc
        self._run_until(lambda: not self._unconfirmed, timeout, "waiting for confirms")
        if self._nacked:
            raise PublishNotConfirmed(f"broker nacked {self._nacked} message(s)")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._blocked_since is not None:
            # the broker reads nothing until the alarm clears, then would route what waits unread (our batch)
            # before it saw a close: reset the connection instead, so that it goes unread
            _reset(conn)
        elif conn is not None and conn.is_open:
            try:
                conn.close()
                deadline = time.monotonic() + 2
                while not conn.is_closed and time.monotonic() < deadline:
                    conn.ioloop.poll()
                    conn.ioloop.process_timeouts()
            except PIKA_ERRORS:
                pass
            if not conn.is_closed:
                _reset(conn)
        if conn is not None:
            conn.ioloop.deactivate_poller()
            conn.ioloop.close()


def _reset(conn: pika.SelectConnection) -> None:
    """Close the connection's socket with a TCP reset (``SO_LINGER`` 0): nothing still buffered is sent."""
    sock = getattr(getattr(conn, "_transport", None), "_sock", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
