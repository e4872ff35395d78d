"""The Stripe SDK's HTTP clients (``handlers.payments.stripe_client``): what the SDK is told when a request
fails, the environment's proxy, kept connections, which client is used, and the SDK's log lines.

``ThreadConnectionClient`` (one kept ``http.client`` connection per thread) is the service's unless a proxy
applies or urllib3 is traced; ``Urllib3Client`` is used then.  Both answer the same failure cases alike.

The SDK retries (with the same idempotency key) what its HTTP client says may
be retried: a timeout or a dropped connection, never a certificate that does
not verify.  Each case is a real socket on this machine: a port nobody
listens on, a server that never answers, a plain-HTTP server spoken to in
TLS, a proxy that records what it was asked.  The successful path, through
the SDK and against the Stripe fake, is the gateway's
(``tests/integration/test_payments_stripe.py``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import stripe
from stripe import APIConnectionError

from handlers.payments import stripe_client as module
from handlers.payments.stripe_client import ThreadConnectionClient, Urllib3Client, http_client

CLIENTS = [Urllib3Client, ThreadConnectionClient]
#: the pseudo-header the recorder notes each request's client port under
PORT = "x-recorded-client-port"


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with a small JSON body and records its request line and headers."""

    seen: list[tuple[str, str, dict[str, str]]] = []
    protocol_version = "HTTP/1.1"  # keeps connections open, as the API does

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        headers = {k.lower(): v for k, v in self.headers.items()}
        headers[PORT] = str(self.client_address[1])  # the client's port: one per connection
        self.seen.append((self.requestline, body, headers))
        payload = b'{"id": "pi_1", "object": "payment_intent"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Request-Id", "req_123")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, str, dict[str, str]]]]]:
    seen: list[tuple[str, str, dict[str, str]]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("Client", CLIENTS)
def test_a_request_returns_the_body_the_status_and_headers_that_ignore_case(Client, recorder) -> None:
    base, seen = recorder
    client = Client(base, timeout=5)
    body, status, headers = client.request("post", f"{base}/v1/payment_intents", {"Idempotency-Key": "k1"}, "a=1")
    assert (status, body) == (200, b'{"id": "pi_1", "object": "payment_intent"}')
    assert headers["request-id"] == headers["Request-Id"] == "req_123"
    assert seen == [("POST /v1/payment_intents HTTP/1.1", "a=1", seen[0][2])]
    assert seen[0][2]["idempotency-key"] == "k1"


@pytest.mark.parametrize("Client", CLIENTS)
def test_a_refused_connection_may_be_retried(Client) -> None:
    base = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(APIConnectionError) as raised:
        Client(base, timeout=5).request("post", f"{base}/v1/payment_intents", {}, "a=1")
    assert raised.value.should_retry is True
    assert "Network error" in str(raised.value)


@pytest.mark.parametrize("Client", CLIENTS)
def test_a_server_that_never_answers_times_out_and_may_be_retried(Client) -> None:
    with socket.socket() as listener:  # accepts (the kernel does) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(APIConnectionError) as raised:
            Client(base, timeout=0.5).request("post", f"{base}/v1/payment_intents", {}, "a=1")
        waited = time.monotonic() - started
    assert raised.value.should_retry is True
    assert 0.4 < waited < 5, waited


@pytest.mark.parametrize("Client", CLIENTS)
def test_a_tls_failure_is_not_retried(Client, recorder) -> None:
    base, _ = recorder  # plain HTTP, spoken to in TLS: the handshake fails as a certificate that does not verify would
    tls_base = base.replace("http://", "https://")
    with pytest.raises(APIConnectionError) as raised:
        Client(tls_base, timeout=5).request("get", f"{tls_base}/v1/payment_intents", {})
    assert raised.value.should_retry is False


def test_the_proxy_of_the_environment_is_used_unless_no_proxy_names_the_address(recorder, monkeypatch) -> None:
    proxy, seen = recorder
    api = "http://api.stripe.invalid"
    monkeypatch.setenv("HTTP_PROXY", proxy)
    client = Urllib3Client(api, timeout=5)
    _, status, _ = client.request("get", f"{api}/v1/payment_intents/pi_1", {})
    assert status == 200
    assert seen[-1][0] == f"GET {api}/v1/payment_intents/pi_1 HTTP/1.1"  # the absolute form: through the proxy

    monkeypatch.setenv("NO_PROXY", "api.stripe.invalid")
    with pytest.raises(APIConnectionError):  # straight to the address, which does not resolve
        Urllib3Client(api, timeout=5).request("get", f"{api}/v1/payment_intents/pi_1", {})
    assert len(seen) == 1


def _from_threads(client: Any, base: str, threads: int = 8, each: int = 20) -> list[BaseException]:
    """``each`` requests from each of ``threads`` threads at once; what they raised."""
    errors: list[BaseException] = []

    def calls() -> None:
        try:
            for _ in range(each):
                assert client.request("get", f"{base}/v1/payment_intents/pi_1", {})[1] == 200
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    started = [threading.Thread(target=calls) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return errors


def test_threads_share_one_pool_of_kept_connections(recorder) -> None:
    base, seen = recorder
    client = Urllib3Client(base, timeout=5)
    assert not _from_threads(client, base) and len(seen) == 160
    pool = client._pool.connection_from_url(base)
    assert pool.num_connections <= 8  # at most one per thread in flight: kept and reused, not one per request


def _connections(seen: list[tuple[str, str, dict[str, str]]]) -> int:
    return len({headers[PORT] for _, _, headers in seen})


def test_one_thread_keeps_one_connection_and_a_str_body_goes_as_utf8(recorder) -> None:
    base, seen = recorder
    client = ThreadConnectionClient(base, timeout=5)
    for i in range(5):
        body, status, _ = client.request("post", f"{base}/v1/payment_intents?expand[]=x", {"X-N": str(i)}, "d=é")
        assert status == 200
    assert [line for line, _, _ in seen] == ["POST /v1/payment_intents?expand[]=x HTTP/1.1"] * 5
    assert seen[0][1] == "d=é" and seen[0][2]["content-length"] == str(len("d=é".encode()))
    assert _connections(seen) == 1  # kept and reused, not one connection per request


def test_threads_each_keep_a_connection_of_their_own(recorder) -> None:
    base, seen = recorder
    assert not _from_threads(ThreadConnectionClient(base, timeout=5), base) and len(seen) == 160
    assert _connections(seen) == 8


class _ClosingServer:
    """Answers each connection's first request (keep-alive, no ``Connection: close``), then closes it: what a
    server does to a connection it kept idle too long.  Counts the requests it answered."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.answered = 0
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if not data:
                    continue
                body = b'{"id": "pi_1"}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                self.answered += 1
                time.sleep(0.05)  # then the server closes it, before the client asks again

    def close(self) -> None:
        self.listener.close()


def test_a_kept_connection_the_server_closed_is_replaced_before_a_request_is_sent() -> None:
    server = _ClosingServer()
    try:
        client = ThreadConnectionClient(server.base, timeout=5)
        for _ in range(3):
            assert client.request("get", f"{server.base}/v1/payment_intents/pi_1", {})[1] == 200
            time.sleep(0.2)  # the server has closed it by now
        assert server.answered == 3
    finally:
        server.close()


def test_https_verifies_the_certificate_and_host_name_against_the_sdks_bundle() -> None:
    context = ThreadConnectionClient("https://api.stripe.com", timeout=5)._context
    assert context is not None
    assert context.check_hostname is True
    assert context.verify_mode.name == "CERT_REQUIRED"
    with pytest.raises(ValueError, match="not an http"):
        ThreadConnectionClient("ftp://api.stripe.com", timeout=5)


def test_the_client_is_urllib3s_when_a_proxy_applies_or_urllib3_is_traced(monkeypatch) -> None:
    api = "https://api.stripe.invalid"
    assert isinstance(http_client(api, 5), ThreadConnectionClient)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert isinstance(http_client(api, 5), Urllib3Client)
    monkeypatch.setenv("NO_PROXY", "api.stripe.invalid")
    assert isinstance(http_client(api, 5), ThreadConnectionClient)
    monkeypatch.setattr(module, "_urllib3_traced", lambda: True)
    assert isinstance(http_client(api, 5), Urllib3Client)


def test_the_sdks_log_lines_are_formatted_only_when_the_stripe_logger_takes_them(recorder, monkeypatch, caplog) -> None:
    """The SDK formats its request lines (the form body, the answer) for the ``stripe`` logger, which drops
    them at WARNING: with the service's client they are not formatted then, and appear as before at DEBUG."""
    base, _ = recorder
    formatted: list[str] = []
    logfmt = stripe._util.logfmt  # type: ignore[attr-defined]
    monkeypatch.setattr(stripe._util, "logfmt", lambda props: formatted.append(props["message"]) or logfmt(props))
    monkeypatch.setattr(stripe, "log", None)
    client = module.stripe_client(
        module.StripeSettings(
            api_key="sk_test_x", webhook_secret="whsec_x", api_base=base, timeout_seconds=5, max_network_retries=0
        )
    )

    def create() -> None:
        client.raw_request("post", "/v1/payment_intents", amount=100, idempotency_key=str(uuid.uuid4()))

    logging.getLogger("stripe").setLevel(logging.WARNING)
    create()
    assert formatted == []

    caplog.set_level(logging.DEBUG, logger="stripe")
    create()
    assert "Request to Stripe api" in formatted and "Post details" in formatted
    assert any("Request to Stripe api" in r.getMessage() for r in caplog.records)
    assert any("Post details" in r.getMessage() and "amount=100" in r.getMessage() for r in caplog.records)


def test_a_kept_connection_on_a_descriptor_above_1023_is_kept(recorder) -> None:
    """A worker with many sockets and files open: the look at a kept connection must not fail on a high
    descriptor (``select`` cannot take one above 1023), or every request would open a new connection."""
    base, seen = recorder
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        client = ThreadConnectionClient(base, timeout=5)
        for _ in range(3):
            assert client.request("get", f"{base}/v1/payment_intents/pi_1", {})[1] == 200
        assert client._local.conn.sock.fileno() > 1023
    finally:
        for fd in filler:
            os.close(fd)
    assert _connections(seen) == 1
