"""``scripts/bench_http.py``'s raw keep-alive client: a request that times out must not take its
connection's place with it (the soak's load generator through the shim stopped so)."""

from __future__ import annotations

import asyncio

from scripts.bench_http import _Connections

ANSWER = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}"


def test_after_a_request_timed_out_the_next_one_gets_a_connection_and_its_answer() -> None:
    async def run() -> list[object]:
        first = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    if not first.is_set():  # the first request ever is never answered
                        first.set()
                        continue
                    writer.write(ANSWER)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = _Connections("127.0.0.1", port, 1)  # one connection at most
        request = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        results: list[object] = []
        for _ in range(3):
            try:
                results.append(await asyncio.wait_for(pool.request(request), 0.5))
            except TimeoutError:
                results.append("timeout")
        server.close()
        return results

    assert asyncio.run(run()) == ["timeout", 202, 202]
