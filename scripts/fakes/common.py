"""Shared plumbing of the fake payment providers (test use only).

Each fake is a :class:`FakeApp` (the provider's behaviour, no HTTP) served by
:class:`FakeHandler` on a ``ThreadingHTTPServer``.  This module owns what the
two fakes have in common:

* idempotency replay (Stripe ``Idempotency-Key``, PayPal ``PayPal-Request-Id``):
  the first response to a key is stored; the same key with the same request
  gets it back, the same key with a different request gets the app's
  conflict answer;
* fault injection, configured through ``POST /_fake/faults``;
* the control endpoints every fake has (``/_fake/reset``, ``/_fake/faults``,
  ``/_fake/charges``, ``/_fake/log``).

Fault spec (JSON body of ``POST /_fake/faults``)::

    {"count": 2, "status": 503}                  next 2 API calls answer 503
    {"count": 1, "delay": 3}                     next call waits 3 s first
    {"count": 1, "drop": true}                   next call: connection closed, nothing done
    {"count": 1, "drop": true, "after_work": true}   work done, answer lost
    {"count": 1, "delay": 3, "after_work": true}     work done, answer 3 s late
    {"rate": 0.2, "seed": 7, "status": 503}      20 % of calls fail, reproducibly
    optional "path": "/v1/payment_intents"       only calls whose path starts so
    optional "retry_after": 1                    Retry-After header on a status fault

Response latency (``POST /_fake/latency`` with ``{"ms": 150}``, or the fake's
``--latency-ms``): the calls the app names in :meth:`FakeApp.latency_for` (for
Stripe: creating and confirming a PaymentIntent) wait that long before they are
answered, as a real provider takes its time.  The wait happens in the request's
own thread, outside the app's lock: other requests, control calls included, are
served meanwhile (the server runs a thread per connection).

A fake can deliver the provider's webhooks (:class:`WebhookSender`): in a
background thread, retried a few times while the receiver answers 5xx or 429
or cannot be reached, each attempt logged on stderr and kept for
``GET /_fake/webhooks``.

A fake can also listen over https (``start(..., tls=tls_context(cert, key))``
or ``--tls-port/--tls-cert/--tls-key``), sharing one app with its http
listener: PayPal's certificate URL must be https (see ``paypal_certs``).

Only the standard library is used, so the fakes run anywhere.
"""

from __future__ import annotations

import html
import json
import random
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CONTROL_PREFIX = "/_fake/"


@dataclass
class Response:
    """One answer of a fake.  ``store`` says whether idempotency keeps it."""

    status: int
    body: Any = None  # dict/list → JSON, str → text, bytes → raw
    headers: dict[str, str] = field(default_factory=dict)
    store: bool | None = None  # None: store when status < 400
    replayed: bool = False  # answered from the idempotency store

    def should_store(self) -> bool:
        return self.status < 400 if self.store is None else self.store


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    host: str

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Fault:
    count: int | None = 1
    rate: float | None = None
    seed: int | None = None
    status: int | None = None
    delay: float = 0.0
    drop: bool = False
    after_work: bool = False
    path: str = ""
    retry_after: float | None = None
    rng: random.Random | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        known = {"count", "rate", "seed", "status", "delay", "drop", "after_work", "path", "retry_after"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        fault = cls(**data)
        if fault.rate is not None:
            fault.count = None
            fault.rng = random.Random(fault.seed)
        if fault.status is None and not fault.drop and not fault.delay:
            raise ValueError("a fault needs status, drop or delay")
        return fault

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "rng" and v not in (None, "", False, 0.0)}


class WebhookSender:
    """Delivers webhooks to one URL, each in a background thread, as the providers do.

    ``headers`` is called before every attempt (a Stripe signature carries
    the time it was made).  An attempt that gets 5xx, 429 or no answer is
    retried after ``backoff`` seconds, doubling, ``attempts`` times in all;
    any other status ends the delivery.  Every attempt is logged on stderr
    and kept in :attr:`deliveries` (``GET /_fake/webhooks``).
    """

    def __init__(self, url: str, attempts: int = 5, backoff: float = 0.5, timeout: float = 10.0) -> None:
        self.url = url
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.lock = threading.Lock()
        self.deliveries: list[dict[str, Any]] = []
        self.threads: list[threading.Thread] = []

    def send(self, event_id: str, event_type: str, body: bytes, headers: Callable[[], dict[str, str]]) -> None:
        """Deliver ``body`` in a background thread (returns at once)."""
        record: dict[str, Any] = {"event_id": event_id, "event_type": event_type, "url": self.url, "attempts": []}
        with self.lock:
            self.deliveries.append(record)
            del self.deliveries[:-1000]
            self.threads = [t for t in self.threads if t.is_alive()]
            thread = threading.Thread(
                target=self._deliver, args=(record, body, headers), name=f"webhook-{event_id}", daemon=True
            )
            self.threads.append(thread)
        thread.start()

    def _deliver(self, record: dict[str, Any], body: bytes, headers: Callable[[], dict[str, str]]) -> None:
        wait = self.backoff
        for attempt in range(1, self.attempts + 1):
            status, outcome = self._post(body, headers())
            with self.lock:
                record["attempts"].append({"status": status, "outcome": outcome})
                record["status"] = status
            final = status is not None and status < 500 and status != 429
            _log(f"webhook {record['event_type']} {record['event_id']} -> {self.url}: {outcome} (attempt {attempt})")
            if final:
                with self.lock:
                    record["delivered"] = 200 <= (status or 0) < 300
                return
            if attempt < self.attempts:
                time.sleep(wait)
                wait *= 2
        with self.lock:
            record["delivered"] = False
        _log(f"webhook {record['event_type']} {record['event_id']}: gave up after {self.attempts} attempts")

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int | None, str]:
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json", **headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, f"http {response.status}"
        except urllib.error.HTTPError as exc:
            return exc.code, f"http {exc.code}"
        except (OSError, ValueError) as exc:  # refused, reset, timeout, bad URL
            return None, f"{type(exc).__name__}: {exc}"

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait for the deliveries in flight (tests)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return json.loads(json.dumps(self.deliveries))


def refund_form(title: str, summary: str, label: str, default: str) -> Response:
    """The fakes' stand-in for a provider dashboard's refund dialog: one amount, posted back to the same URL."""
    page = (
        "<!doctype html>\n"
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head><body>\n'
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(summary)}</p>\n"
        '<form method="post">\n'
        f'<label>{html.escape(label)} <input name="amount" value="{html.escape(default, quote=True)}"></label>\n'
        '<button type="submit">Refund</button>\n</form>\n'
        "<p>Leave the amount empty to refund the rest.</p>\n</body></html>\n"
    )
    return Response(200, page, {"Content-Type": "text/html; charset=utf-8"})


def form_field(req: Request, name: str) -> str | None:
    """A field of a posted HTML form (``application/x-www-form-urlencoded``) or of a JSON object body; None when absent or empty."""
    if req.headers.get("content-type", "").startswith("application/json"):
        try:
            data = req.json()
        except ValueError:
            return None
        value = data.get(name) if isinstance(data, dict) else None
    else:
        value = (parse_qs(req.body.decode(errors="replace")).get(name) or [None])[-1]
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _log(message: str) -> None:
    print(f"[fake] {message}", file=sys.stderr, flush=True)


class FakeApp:
    """Provider behaviour.  Subclasses implement :meth:`handle_api`."""

    #: request header carrying the idempotency key (lower case)
    idempotency_header = ""
    #: response header set on a replayed answer, if the provider sets one
    replay_header: str | None = None

    def __init__(self) -> None:
        self.lock = threading.RLock()  # one lock: the fakes are not about throughput
        self.faults: list[Fault] = []
        self.idempotent: dict[tuple[str, str], tuple[Any, Response]] = {}
        self.log: list[dict[str, Any]] = []
        self.api_requests = 0
        #: where webhooks go (None: nowhere), set by the provider's configuration
        self.webhooks: WebhookSender | None = None
        #: base URL of the https listener serving this app, when there is one
        self.tls_url: str | None = None
        #: seconds the calls named by :meth:`latency_for` wait before they are answered
        self.latency = 0.0

    # -- to implement -------------------------------------------------------
    def handle_api(self, req: Request) -> Response:  # pragma: no cover - abstract
        raise NotImplementedError

    def handle_control(self, req: Request, path: str) -> Response | None:
        """Provider-specific ``/_fake/...`` endpoints (path without prefix)."""
        return None

    def charges(self) -> dict[str, Any]:
        return {}

    def reset_provider(self) -> None:
        """Forget payments (subclasses clear their own tables)."""

    def fault_response(self, status: int) -> Response:
        return Response(status, {"error": "injected fault"})

    def idempotency_conflict(self, req: Request) -> Response:
        return Response(400, {"error": "idempotency key reused with other parameters"}, store=False)

    def idempotency_scope(self, req: Request) -> str:
        """Who owns the key (keys are per account/credential)."""
        return req.headers.get("authorization", "")

    def fingerprint(self, req: Request) -> Any:
        return (req.method, req.path, req.body)

    def authenticate(self, req: Request) -> Response | None:
        """Return an error response when the request is not authorised."""
        return None

    def latency_for(self, req: Request) -> float:
        """Seconds this API call waits before it is answered (the provider's own processing time)."""
        return 0.0

    # -- shared -------------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.idempotent.clear()
            self.log.clear()
            self.api_requests = 0
            self.reset_provider()

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in list(self.faults):
                if not path.startswith(fault.path):
                    continue
                if fault.rng is not None:
                    if fault.rng.random() < (fault.rate or 0.0):
                        return fault
                    continue
                if fault.count is not None and fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                    return fault
            return None

    def process(self, req: Request) -> Response:
        """Authenticate, apply idempotency, run the endpoint."""
        with self.lock:
            self.api_requests += 1
            denied = self.authenticate(req)
            if denied is not None:
                resp = denied
            else:
                key = req.headers.get(self.idempotency_header) if self.idempotency_header else None
                resp = self._idempotent(req, key) if key and req.method == "POST" else self.handle_api(req)
            self.log.append(
                {
                    "method": req.method,
                    "path": req.path,
                    "idempotency_key": req.headers.get(self.idempotency_header),
                    "status": resp.status,
                    "replayed": resp.replayed,
                }
            )
            del self.log[:-1000]
            return resp

    def _idempotent(self, req: Request, key: str) -> Response:
        scope = (self.idempotency_scope(req), key)
        stored = self.idempotent.get(scope)
        fingerprint = self.fingerprint(req)
        if stored is not None:
            if stored[0] != fingerprint:
                return self.idempotency_conflict(req)
            first = stored[1]
            headers = dict(first.headers)
            if self.replay_header:
                headers[self.replay_header] = "true"
            return Response(first.status, first.body, headers, replayed=True)
        resp = self.handle_api(req)
        if resp.should_store():
            self.idempotent[scope] = (fingerprint, resp)
        return resp

    def control(self, req: Request) -> Response:
        path = req.path[len(CONTROL_PREFIX) :]
        if path == "reset" and req.method == "POST":
            self.reset()
            return Response(200, {"reset": True})
        if path == "faults":
            with self.lock:
                if req.method == "POST":
                    try:
                        self.faults.append(Fault.from_json(req.json()))
                    except (ValueError, TypeError) as exc:
                        return Response(400, {"error": str(exc)})
                elif req.method == "DELETE":
                    self.faults.clear()
                return Response(200, {"faults": [f.describe() for f in self.faults]})
        if path == "latency":
            if req.method == "POST":
                try:
                    ms = float(req.json().get("ms", 0))
                except (ValueError, TypeError, AttributeError):
                    return Response(400, {"error": 'latency takes {"ms": <milliseconds, >= 0>}'})
                if not ms >= 0:
                    return Response(400, {"error": "latency must be >= 0 ms"})
                self.latency = ms / 1000.0
            return Response(200, {"ms": self.latency * 1000.0})
        if path == "charges" and req.method == "GET":
            with self.lock:
                return Response(200, {**self.charges(), "api_requests": self.api_requests})
        if path == "log" and req.method == "GET":
            with self.lock:
                return Response(200, {"requests": list(self.log)})
        if path == "webhooks" and req.method == "GET":
            sender = self.webhooks
            return Response(
                200, {"url": sender.url if sender else None, "deliveries": sender.snapshot() if sender else []}
            )
        with self.lock:
            resp = self.handle_control(req, path)
        return resp if resp is not None else Response(404, {"error": f"no control endpoint {req.path}"})


class FakeHandler(BaseHTTPRequestHandler):
    """HTTP adapter: parses the request, applies faults, writes the answer."""

    protocol_version = "HTTP/1.1"
    #: headers and body leave in separate writes: with Nagle on, a keep-alive client waits ~40 ms for the
    #: second (delayed ACK), which made every call to the fakes take 50 ms; the providers answer at once
    disable_nagle_algorithm = True
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        if self.server.verbose:
            super().log_message(format, *args)

    def handle(self) -> None:
        # TLS handshakes happen here, in the connection's thread, not in the accepting one.
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                self.close_connection = True
                return
        super().handle()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            host=self.headers.get("Host") or "%s:%s" % self.server.server_address[:2],
        )
        app = self.server.app
        if req.path.startswith(CONTROL_PREFIX):
            self._send(app.control(req))
            return
        wait = app.latency_for(req)
        if wait > 0:
            time.sleep(wait)  # in this connection's thread, outside the app's lock: others go on
        fault = app.take_fault(req.path)
        if fault is not None and not fault.after_work:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.drop:
                self._drop()
                return
            if fault.status:
                resp = app.fault_response(fault.status)
                if fault.retry_after is not None:
                    resp.headers["Retry-After"] = str(fault.retry_after)
                self._send(resp)
                return
        resp = app.process(req)
        if fault is not None and fault.after_work:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.drop:
                self._drop()
                return
        self._send(resp)

    def _drop(self) -> None:
        """Close the socket without a status line: the client sees a reset."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, resp: Response) -> None:
        if isinstance(resp.body, (dict, list)):
            payload = json.dumps(resp.body).encode()
            ctype = "application/json"
        elif isinstance(resp.body, str):
            payload = resp.body.encode()
            ctype = "text/plain; charset=utf-8"
        else:
            payload = resp.body or b""
            ctype = "application/octet-stream"
        try:
            self.send_response(resp.status)
            headers = {"Content-Type": ctype, **resp.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (timeout): exactly the "answer lost" case.
            self.close_connection = True


class FakeServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that carries its :class:`FakeApp`."""

    daemon_threads = True
    allow_reuse_address = True
    #: pending connections the listening socket holds (socketserver's 5 drops SYNs when many clients
    #: connect at once, and each dropped one costs its client a second's retransmission)
    request_queue_size = 1024

    def __init__(
        self, address: tuple[str, int], app: FakeApp, verbose: bool = False, tls: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(address, FakeHandler)
        self.app = app
        self.verbose = verbose
        self.tls = tls

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and close the socket (for tests)."""
        self.shutdown()
        self.server_close()


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context for an https listener of a fake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def start(
    app: FakeApp, port: int, host: str = "127.0.0.1", verbose: bool = False, tls: ssl.SSLContext | None = None
) -> FakeServer:
    """Serve ``app`` in a daemon thread; ``port=0`` picks a free port; ``tls`` makes it https.

    One app may be served by several servers (e.g. http for the API and https
    for PayPal's certificate URL): they share its state.
    """
    server = FakeServer((host, port), app, verbose=verbose, tls=tls)
    threading.Thread(target=server.serve_forever, name=f"fake-{type(app).__name__}", daemon=True).start()
    return server


def run_cli(
    make_app: Callable[..., FakeApp], default_port: int, description: str, extra: Callable[[Any], None] | None = None
) -> None:
    """Parse ``--host/--port`` (and ``extra`` options) and serve in the foreground."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument("--tls-port", type=int, help="also serve over https on this port (needs --tls-cert/--tls-key)")
    parser.add_argument("--tls-cert", help="PEM certificate of the https listener")
    parser.add_argument("--tls-key", help="PEM private key of the https listener")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    options = {
        k: v for k, v in vars(args).items() if k not in ("host", "port", "verbose", "tls_port", "tls_cert", "tls_key")
    }
    app = make_app(**options)
    server = FakeServer((args.host, args.port), app, verbose=args.verbose)
    print(f"{description} listening on {server.url}", flush=True)
    if args.tls_port is not None:
        if not (args.tls_cert and args.tls_key):
            parser.error("--tls-port needs --tls-cert and --tls-key")
        secure = start(app, args.tls_port, args.host, args.verbose, tls_context(args.tls_cert, args.tls_key))
        app.tls_url = secure.url
        print(f"{description} listening on {secure.url}", flush=True)
    if app.webhooks is not None:
        print(f"{description} delivers webhooks to {app.webhooks.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
