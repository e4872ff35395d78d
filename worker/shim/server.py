"""Serving the shim with uvicorn (``orders shim``).

:func:`uvicorn_options` is the one place uvicorn's edge settings come from:
the HTTP protocol with the head limits (:mod:`worker.shim.protocol`), the
keep-alive timeout, and which peers may name the client in
``X-Forwarded-For``.  uvicorn trusts that header from 127.0.0.1 unless told
otherwise, which let any local client pick the rate-limit bucket of any
address; here it is honoured only from ``shim.trusted_proxies``.

On start the shim logs one ``listening`` line with its URL and worker count,
as the payment fakes print theirs.  With one worker the socket is bound here
first, so the line names the real port even for ``--port 0``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import structlog

from worker.settings import Settings
from worker.shim.protocol import EdgeHttpToolsProtocol

log = structlog.get_logger("worker.shim")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """``uvicorn.run``/``uvicorn.Config`` keyword arguments for the shim (all but the app, host and port)."""
    cfg = settings.shim
    proxies = [str(network) for network in cfg.trusted_proxies]
    return {
        # access logs cost ~10% of throughput; /metrics counts every request instead
        "access_log": False,
        "log_config": None,
        "timeout_graceful_shutdown": 10,
        "http": functools.partial(
            EdgeHttpToolsProtocol, max_head_bytes=cfg.max_header_bytes, head_timeout=cfg.header_timeout_seconds
        ),
        "timeout_keep_alive": cfg.keep_alive_seconds,
        # without trusted proxies the middleware is left out: the peer's address is the client's
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies,
    }


def serve(settings: Settings, config: Path | None, host: str, port: int, workers: int) -> None:
    """Run uvicorn in the foreground until SIGINT/SIGTERM.

    With one worker the app is built here from ``settings``; with several,
    uvicorn imports :func:`worker.shim.app.from_environment` in each worker
    process, which reads the same configuration (``ORDERS_CONFIG`` is set
    to ``config`` for them).  Either way the app learns ``workers`` as
    ``shim.workers`` (the workers inherit ``ORDERS_SHIM__WORKERS``): while
    Redis is unreachable each process enforces its share of the rate limits.
    Port 0 needs a single worker: with several, uvicorn's parent binds their
    shared socket, and the port it got could not be told.
    """
    import uvicorn

    os.environ["ORDERS_SHIM__WORKERS"] = str(workers)
    settings = settings.model_copy(update={"shim": settings.shim.model_copy(update={"workers": workers})})
    options = {"host": host, "port": port, **uvicorn_options(settings)}
    if workers == 1:
        from worker.shim.app import create_app

        server = uvicorn.Server(uvicorn.Config(create_app(settings), **options))
        sock = server.config.bind_socket()  # exits (3) with uvicorn's message when the port is taken
        log.info("listening", url=_url(host, sock.getsockname()[1]), workers=workers)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        if not server.started:
            raise SystemExit(3)  # what uvicorn.run exits with when start-up failed
        return
    if config is not None:
        os.environ["ORDERS_CONFIG"] = str(config)
    log.info("listening", url=_url(host, port), workers=workers)
    uvicorn.run("worker.shim.app:from_environment", factory=True, workers=workers, **options)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
