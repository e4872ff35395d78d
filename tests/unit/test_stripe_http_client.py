"""``handlers.payments.stripe_client.Urllib3Client``: what the Stripe SDK is told when a request fails,
and the environment's proxy.

The SDK retries (with the same idempotency key) what its HTTP client says may
be retried: a timeout or a dropped connection, never a certificate that does
not verify.  Each case is a real socket on this machine: a port nobody
listens on, a server that never answers, a plain-HTTP server spoken to in
TLS, a proxy that records what it was asked.  The successful path, through
the SDK and against the Stripe fake, is the gateway's
(``tests/integration/test_payments_stripe.py``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from stripe import APIConnectionError

from handlers.payments.stripe_client import Urllib3Client


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with a small JSON body and records its request line and headers."""

    seen: list[tuple[str, str, dict[str, str]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        self.seen.append((self.requestline, body, {k.lower(): v for k, v in self.headers.items()}))
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


def test_a_request_returns_the_body_the_status_and_headers_that_ignore_case(recorder) -> None:
    base, seen = recorder
    client = Urllib3Client(base, timeout=5)
    body, status, headers = client.request("post", f"{base}/v1/payment_intents", {"Idempotency-Key": "k1"}, "a=1")
    assert (status, body) == (200, b'{"id": "pi_1", "object": "payment_intent"}')
    assert headers["request-id"] == headers["Request-Id"] == "req_123"
    assert seen == [("POST /v1/payment_intents HTTP/1.1", "a=1", seen[0][2])]
    assert seen[0][2]["idempotency-key"] == "k1"


def test_a_refused_connection_may_be_retried() -> None:
    base = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(APIConnectionError) as raised:
        Urllib3Client(base, timeout=5).request("post", f"{base}/v1/payment_intents", {}, "a=1")
    assert raised.value.should_retry is True
    assert "Network error" in str(raised.value)


def test_a_server_that_never_answers_times_out_and_may_be_retried() -> None:
    with socket.socket() as listener:  # accepts (the kernel does) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(APIConnectionError) as raised:
            Urllib3Client(base, timeout=0.5).request("post", f"{base}/v1/payment_intents", {}, "a=1")
        waited = time.monotonic() - started
    assert raised.value.should_retry is True
    assert 0.4 < waited < 5, waited


def test_a_tls_failure_is_not_retried(recorder) -> None:
    base, _ = recorder  # plain HTTP, spoken to in TLS: the handshake fails as a certificate that does not verify would
    tls_base = base.replace("http://", "https://")
    with pytest.raises(APIConnectionError) as raised:
        Urllib3Client(tls_base, timeout=5).request("get", f"{tls_base}/v1/payment_intents", {})
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


def test_threads_share_one_pool_of_kept_connections(recorder) -> None:
    base, seen = recorder
    client = Urllib3Client(base, timeout=5)
    errors: list[BaseException] = []

    def calls() -> None:
        try:
            for _ in range(20):
                assert client.request("get", f"{base}/v1/payment_intents/pi_1", {})[1] == 200
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=calls) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 160
    pool = client._pool.connection_from_url(base)
    assert pool.num_connections <= 8  # at most one per thread in flight: kept and reused, not one per request
