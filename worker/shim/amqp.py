"""The shim's one RabbitMQ connection: pika's asyncio adapter on uvicorn's event loop.

Every request of a shim process publishes on the same confirmed channel, so
publishes from concurrent requests are pipelined (pika writes them out in
one go per loop turn, RabbitMQ confirms them in batches with ``multiple``)
and no request needs a thread or a connection of its own.  A publish waits
for its own confirm: a 202 is never answered before the broker has the
command.  ``Prefer: wait`` uses RabbitMQ direct reply-to on the same channel
(it consumes ``amq.rabbitmq.reply-to``, as direct reply-to requires).

When the connection or the channel goes, every publish and request waiting
on it fails with :class:`ConnectionLost` at once, and the next publish opens
a new connection (concurrent requests share that one attempt).  Everything
is bounded by the caller's timeout, so a broker that stops answering costs
a request ``timeout`` seconds, not forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pika
import pika.exceptions
import structlog
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.spec import Basic

from worker.errors import ConnectionLost, PublishNotConfirmed
from worker.rabbit.connection import REPLY_TO, NodeRotation, Outgoing, basic_properties

log = structlog.get_logger("worker.shim.amqp")


class _TurnWritesConnection(AsyncioConnection):
    """An ``AsyncioConnection`` that writes once per turn of the event loop.

    pika hands every frame to the socket as a buffer of its own (three per
    message); here the frames emitted during one turn of the loop, by every
    request publishing in it, are joined and written together on the next.
    """

    _out: list[bytes] | None = None

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._out is None:
            self._out = []
            self.ioloop.call_soon(self._write_out)
        self._out.append(data)

    def _write_out(self) -> None:
        out, self._out = self._out, None
        if out and self._transport is not None:
            super()._adapter_emit_data(b"".join(out))


class _Closing(ConnectionLost):
    """The publisher was closed on purpose (shutdown): nothing to warn about."""


class AsyncChannel:
    """A confirmed channel with direct reply-to, opened on first use on the running loop."""

    def __init__(self, url: str, heartbeat: int) -> None:
        self._nodes = NodeRotation(url, heartbeat)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: AsyncioConnection | None = None
        self._channel: Any = None
        self._opening: asyncio.Future[Any] | None = None
        #: delivery tag → (confirm future, message id) of publishes awaiting their confirm
        self._pending: dict[int, tuple[asyncio.Future[None], str]] = {}
        self._returned: set[str] = set()
        self._tag = 0
        #: correlation id → future of the reply of a request
        self._replies: dict[str, asyncio.Future[bytes]] = {}

    @property
    def is_open(self) -> bool:
        return self._channel is not None and self._channel.is_open

    async def publish(self, message: Outgoing, timeout: float) -> None:
        """Publish (mandatory) and wait for the confirm; ConnectionLost / PublishNotConfirmed otherwise."""
        async with asyncio.timeout(timeout):
            await self._confirmed(await self._ready(), message)

    async def request(self, message: Outgoing, timeout: float) -> bytes | None:
        """Publish with ``reply_to`` and wait up to ``timeout`` for the answer (None: none came in time).

        The publish itself must be confirmed within ``timeout`` or it raises.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        props = dict(message.properties)
        correlation = props.get("correlation_id") or props.get("message_id") or ""
        props.update(reply_to=REPLY_TO, correlation_id=correlation)
        reply: asyncio.Future[bytes] = loop.create_future()
        try:
            async with asyncio.timeout_at(deadline):
                channel = await self._ready()
                self._replies[correlation] = reply  # before the publish: the answer may come at once
                await self._confirmed(channel, Outgoing(message.exchange, message.routing_key, message.body, props))
            try:
                async with asyncio.timeout_at(deadline):
                    return await reply
            except TimeoutError:
                return None
        finally:
            if self._replies.get(correlation) is reply:
                del self._replies[correlation]
            if reply.done() and not reply.cancelled():
                reply.exception()  # failed with the connection while the publish failed too

    async def ping(self, timeout: float) -> None:
        """Raise ConnectionLost unless the channel is (or can be) opened within ``timeout``."""
        async with asyncio.timeout(timeout):
            await self._ready()

    def close(self) -> None:
        self._on_lost(_Closing("publisher closed"))

    # -- publishing ---------------------------------------------------------------

    async def _confirmed(self, channel: Any, message: Outgoing) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message_id = str(message.properties.get("message_id") or "")
        try:
            channel.basic_publish(
                message.exchange,
                message.routing_key,
                message.body,
                basic_properties(message.properties),
                mandatory=True,
            )
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._on_lost(exc)
            raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
        self._tag += 1
        self._pending[self._tag] = (future, message_id)
        await future

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag, acked = method.delivery_tag, isinstance(method, Basic.Ack)
        tags = [t for t in self._pending if t <= tag] if method.multiple else [tag]
        for t in tags:
            entry = self._pending.pop(t, None)
            if entry is None:
                continue
            future, message_id = entry
            if future.done():  # its request gave up meanwhile
                continue
            if message_id in self._returned:
                self._returned.discard(message_id)
                future.set_exception(PublishNotConfirmed(f"unroutable: {message_id}"))
            elif acked:
                future.set_result(None)
            else:
                future.set_exception(PublishNotConfirmed(f"nacked by the broker: {message_id}"))

    def _on_return(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        # basic.return of a mandatory publish arrives before its ack
        self._returned.add(props.message_id or "")

    def _on_reply(self, _channel: Any, _method: Any, props: Any, body: bytes) -> None:
        future = self._replies.get(props.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(body)

    # -- the connection -----------------------------------------------------------

    async def _ready(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # a new event loop (a restarted server): start over
                self.close()
            self._loop = loop
        if self.is_open:
            return self._channel
        opening = self._opening
        if opening is None or opening.done():
            opening = self._opening = loop.create_future()
            self._open(loop, opening)
        return await asyncio.shield(opening)

    def _open(self, loop: asyncio.AbstractEventLoop, opening: asyncio.Future[Any]) -> None:
        conn: _TurnWritesConnection | None = None

        def current() -> bool:  # callbacks of a connection already replaced change nothing
            return conn is not None and conn is self._conn

        def on_open(_conn: AsyncioConnection) -> None:
            if current():
                _conn.channel(on_open_callback=on_channel)

        def on_channel(channel: Any) -> None:
            channel.add_on_close_callback(lambda _ch, exc: self._on_lost(exc) if current() else None)
            channel.add_on_return_callback(self._on_return)
            channel.basic_consume(REPLY_TO, self._on_reply, auto_ack=True)
            channel.confirm_delivery(self._on_confirm, callback=lambda _frame: ready(channel))

        def ready(channel: Any) -> None:
            if not current():
                return
            self._channel, self._tag = channel, 0
            self._pending.clear()
            self._returned.clear()
            if not opening.done():
                opening.set_result(channel)

        def on_open_error(_conn: Any, exc: BaseException) -> None:
            if current():
                log.warning("broker connection failed", error=f"{type(exc).__name__}: {exc}")
                self._on_lost(exc)

        def on_close(_conn: Any, exc: BaseException) -> None:
            if current():
                self._on_lost(exc)

        try:
            conn = self._conn = _TurnWritesConnection(
                self._nodes.next(), on_open, on_open_error, on_close, custom_ioloop=loop
            )
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._on_lost(exc)

    def _on_lost(self, exc: BaseException) -> None:
        error = ConnectionLost(f"{type(exc).__name__}: {exc}")
        if (self._channel is not None or self._pending) and not isinstance(exc, _Closing):
            log.warning("broker connection lost", error=str(error))
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.set_exception(error)
            opening.exception()  # retrieved: nobody may be waiting any more
        conn, self._conn, self._channel = self._conn, None, None
        self._fail_all(error)
        if conn is not None and not (conn.is_closed or conn.is_closing):
            try:
                conn.close()
            except pika.exceptions.AMQPError:
                pass

    def _fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(exc)
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(exc)
