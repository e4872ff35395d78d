"""``orders shim`` says where it listens, as the payment fakes do."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx


def _listening(log: Path) -> dict[str, Any] | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "listening":
            return json.loads(line)  # type: ignore[no-any-return]
    return None


def test_shim_logs_the_url_it_really_listens_on_even_for_port_0(service: Any, wait: Any) -> None:
    shim = service("shim", "--port", "0")
    line = wait(lambda: _listening(shim.log), timeout=30, what="the shim's listening line")
    assert line["workers"] == 1
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", line["url"]), line
    assert not line["url"].endswith(":0")
    answer = wait(lambda: _get(line["url"] + "/healthz"), timeout=30, what="the shim at the logged url")
    assert answer.status_code == 200


def test_shim_refuses_port_0_with_several_workers(service: Any, wait: Any) -> None:
    shim = service("shim", "--port", "0", "--workers", "2")
    assert shim.popen is not None
    assert shim.popen.wait(30) == 2
    assert "--port 0 needs a single worker" in shim.log.read_text()


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
