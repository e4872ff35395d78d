"""Serving the shim with uvicorn (``orders shim``)."""

from __future__ import annotations

import os
from pathlib import Path

from worker.settings import Settings


def serve(settings: Settings, config: Path | None, host: str, port: int, workers: int) -> None:
    """Run uvicorn in the foreground until SIGINT/SIGTERM.

    With one worker the app is built here from ``settings``; with several,
    uvicorn imports :func:`worker.shim.app.from_environment` in each worker
    process, which reads the same configuration (``ORDERS_CONFIG`` is set
    to ``config`` for them).  Either way the app learns ``workers`` as
    ``shim.workers`` (the workers inherit ``ORDERS_SHIM__WORKERS``): while
    Redis is unreachable each process enforces its share of the rate limits.
    """
    import uvicorn

    os.environ["ORDERS_SHIM__WORKERS"] = str(workers)
    settings = settings.model_copy(update={"shim": settings.shim.model_copy(update={"workers": workers})})

    # access logs cost ~10% of throughput; /metrics counts every request instead
    options = {"host": host, "port": port, "access_log": False, "log_config": None, "timeout_graceful_shutdown": 10}
    if workers == 1:
        from worker.shim.app import create_app

        uvicorn.run(create_app(settings), **options)  # type: ignore[arg-type]
        return
    if config is not None:
        os.environ["ORDERS_CONFIG"] = str(config)
    uvicorn.run("worker.shim.app:from_environment", factory=True, workers=workers, **options)  # type: ignore[arg-type]
