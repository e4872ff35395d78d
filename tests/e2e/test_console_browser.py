"""The console and the API docs in a real browser: Debian's headless Chromium driven by Playwright.

The real ``orders shim`` and ``orders worker`` (commands only) run on a vhost
of this module's own; the browser signs in through the link
``orders console login`` prints, sees a group of dead letters this test made,
replays it and sees each order applied once; opens an order's story; is
refused without a session, with a user's token, with a used link and with a
POST that lacks its CSRF token.  ``/docs`` and ``/redoc`` render their
operations with every request to another host cut off.

Chromium comes from Debian's ``chromium`` package (``scripts/ensure_browser.sh``,
run by ``scripts/test.sh``, installs it), never a downloaded build; where none
could be installed these tests skip, saying so.  With
``ORDERS_CONSOLE_SCREENSHOTS=DIR`` the three pages are saved there as PNGs
(``docs/img/`` holds the ones docs/operations.md shows).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pika
import pytest
from sqlalchemy import text

from scripts.harness import Proc
from scripts.tcp_proxy import free_port
from tests.support import private_vhost, wait_until

VHOST = "orders-console-browser"
CHROMIUM = os.environ.get("ORDERS_TEST_BROWSER", "/usr/bin/chromium")
#: flags that work on a machine without a display, a sandbox or a network
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ORDERS = str(Path(sys.executable).parent / "orders")
SHOTS = os.environ.get("ORDERS_CONSOLE_SCREENSHOTS")

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no Chromium at {CHROMIUM}: scripts/ensure_browser.sh could not install Debian's chromium here "
        "(no apt-get, no root or no package mirror); the console's browser tests need it",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (the test extra) is missing")
expect = sync_api.expect


class Stack:
    """The shim and a command-only worker pool for this module, on its own vhost."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []

    def start(self, *args: str) -> None:
        self.procs.append(Proc.orders(args, self.env, self.logs / f"{args[0]}-{len(self.procs)}.log"))

    def stop(self) -> None:
        for p in self.procs:
            p.stop(20)

    def login_link(self, user: str = "ops") -> str:
        done = subprocess.run(
            [ORDERS, "console", "login", "--user", user], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        link = done.stdout.strip().splitlines()[-1]
        assert link.startswith(f"http://127.0.0.1:{self.port}/console/login/"), link
        return link


@pytest.fixture(scope="module")
def stack(
    settings: Any, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, commands_only_flags: list[str]
) -> Iterator[Stack]:
    url = private_vhost(settings, VHOST)
    env = {
        **test_env,
        "ORDERS_RABBITMQ__URL": url,
        "ORDERS_CONSOLE__REFRESH_SECONDS": "1",
        "ORDERS_CONSOLE__DEAD_LETTER_INDEX_SECONDS": "1",
        "ORDERS_LOGGING__FORMAT": "console",
    }
    s = Stack(env, tmp_path_factory.mktemp("console-browser"))
    s.env["ORDERS_SHIM__PORT"] = str(s.port)
    s.start("shim")
    s.start("worker", "--processes", "1", *commands_only_flags)
    wait_until(lambda: _answers(s.url), 60, what="the shim to answer")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def commands_only_flags() -> list[str]:
    return ["--queue", "orders.place", "--queue", "orders.cancel", "--queue", "orders.payment-confirmed"]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's Chromium, headless, with a fresh profile (--user-data-dir) for the module."""
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1360, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture
def offline(browser: Any, stack: Stack) -> Iterator[list[str]]:
    """Every request to a host other than the shim's is aborted (the network is cut off); the list of them."""
    shim = urlsplit(stack.url).netloc
    blocked: list[str] = []

    def route(r: Any) -> None:
        if urlsplit(r.request.url).netloc == shim:
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort("internetdisconnected")

    browser.route("**/*", route)
    yield blocked
    browser.unroute("**/*")


@pytest.fixture
def page(browser: Any, offline: list[str]) -> Iterator[Any]:
    p = browser.new_page()
    problems: list[str] = []
    # what the page must never show: a CSP violation (Chromium logs "Refused to ..."), a script error, a dialog
    p.on("console", lambda m: problems.append(m.text) if "Refused to" in m.text or "Policy" in m.text else None)
    p.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    p.on("dialog", lambda d: problems.append(f"a dialog opened: {d.message}"))
    p.problems = problems
    yield p
    p.close()


def _shot(p: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        p.screenshot(path=str(Path(SHOTS) / name), full_page=True)


def _dead_letter(ch: Any, body: bytes, message_id: str, error: str, message: str, **headers: Any) -> None:
    now = datetime.now(UTC).isoformat()
    ch.basic_publish(
        "orders.dlx",
        "orders.place",
        body,
        pika.BasicProperties(
            message_id=message_id,
            type="PlaceOrder",
            content_type="application/json",
            delivery_mode=2,
            headers={
                "x-original-exchange": "orders.commands",
                "x-original-routing-key": "order.place",
                "x-original-queue": "orders.place",
                "x-first-failure-at": now,
                "x-last-failure-at": now,
                "x-attempts": 4,
                "x-error-class": error,
                "x-error-message": message,
                **headers,
            },
        ),
    )


def _sign_in(page: Any, stack: Stack) -> None:
    page.goto(stack.login_link())
    page.get_by_role("button", name="Sign in as ops").click()
    page.wait_for_url(stack.url + "/console")


def test_the_console_refuses_anyone_but_a_signed_in_admin(browser, stack, page, settings):
    r = page.goto(stack.url + "/console")
    assert r.status == 401 and "Not signed in" in page.content()

    user = jwt.encode(
        {"sub": "bob", "roles": ["user"], "exp": int(time.time()) + 600},
        settings.shim.jwt_secret.get_secret_value(),
        algorithm="HS256",
    )
    with_token = browser.new_page()
    with_token.set_extra_http_headers({"Authorization": f"Bearer {user}"})
    assert with_token.goto(stack.url + "/console").status == 403
    assert "for admins" in with_token.content()
    with_token.close()

    link = stack.login_link()
    token = link.rsplit("/", 1)[1]
    page.goto(link)
    page.get_by_role("button", name="Sign in as ops").click()
    page.wait_for_url(stack.url + "/console")
    expect(page.get_by_role("heading", name=re.compile("At a glance"))).to_be_visible()
    cookie = next(c for c in browser.cookies(stack.url) if c["name"] == "orders-console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    again = browser.new_page()
    assert again.goto(link).status == 410  # a used link
    again.close()
    assert browser.request.post(stack.url + "/console/login", form={"token": token}).status == 410
    # the browser holds a valid session; a POST without its CSRF token is still refused
    refused = browser.request.post(stack.url + "/console/dead-letters/refresh", form={"x": "1"})
    assert refused.status == 403 and "CSRF" in refused.text()
    assert page.problems == []


def test_a_group_of_dead_letters_is_replayed_and_each_order_applied_once(browser, stack, page, settings, engine):
    from tests.servers import PRODUCTS
    from worker import catalogue

    catalogue.upsert(engine, [catalogue.ProductRow(**p) for p in PRODUCTS])
    url = stack.env["ORDERS_RABBITMQ__URL"]
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_purge("orders.dead-letter")
    orders = [str(uuid.uuid4()) for _ in range(3)]
    run = uuid.uuid4().hex[:8]
    for i, oid in enumerate(orders):
        body = {
            "order_id": oid,
            "user_id": "alice",
            "items": [{"product_id": "sku-apple", "quantity": 1}],
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
        }
        _dead_letter(
            ch, json.dumps(body).encode(), f"br-{run}-{i}", "CatalogueDown", f"catalogue down for order {oid} (try {i})"
        )
    first = json.dumps(
        {
            "order_id": orders[0],
            "user_id": "alice",
            "items": [{"product_id": "sku-apple", "quantity": 1}],
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
        }
    ).encode()
    _dead_letter(ch, first, f"br-{run}-0", "CatalogueDown", f"catalogue down for order {orders[0]} (try 9)")  # a copy
    _dead_letter(ch, b"<script>alert('owned')</script>", f"xss-{run}", "InvalidMessage", "body is not JSON")
    _dead_letter(ch, b"{}", f"again-{run}", "Boom", "still broken", **{"x-replay-count": 2})
    conn.close()

    _sign_in(page, stack)
    page.goto(stack.url + "/console/dead-letters")
    page.get_by_role("button", name="Read the queue now").click()

    def group_listed() -> bool:
        page.goto(stack.url + "/console/dead-letters")
        return page.get_by_text("CatalogueDown").count() > 0 and page.get_by_text("6 in 3 group(s)").count() > 0

    wait_until(group_listed, 30, interval=0.5, what="the dead-letter group on the page")
    expect(page.get_by_text("1 repeated", exact=True)).to_be_visible()  # replayed twice before and back again
    expect(page.get_by_text("catalogue down for order <uuid> (try <n>)")).to_be_visible()
    _shot(page, "console-dead-letters.png")

    page.get_by_role("link", name=re.compile("CatalogueDown")).click()
    for i in range(3):
        expect(page.get_by_role("link", name=f"br-{run}-{i}")).to_be_visible()
    page.get_by_role("button", name="Replay the group…").click()
    expect(page.get_by_text("would replay 3 message(s)")).to_be_visible()
    expect(page.get_by_text("Nothing of it took effect").first).to_be_visible()  # order facts: no order yet
    page.get_by_role("button", name="Replay 3 message(s)").click()
    page.wait_for_load_state()
    assert page.url == stack.url + "/console/dead-letters/audit", page.locator("main").inner_text()
    expect(page.get_by_text(re.compile(r"replayed 4 of 4"))).to_be_visible()  # three ids, one of them twice
    expect(page.get_by_role("cell", name="ops", exact=True).first).to_be_visible()

    def applied() -> bool:
        with engine.connect() as c:
            return (
                c.execute(
                    text("SELECT count(*) FROM orders WHERE order_id = ANY(CAST(:o AS uuid[]))"), {"o": orders}
                ).scalar()
                == 3
            )

    wait_until(applied, 30, what="the replayed orders to be applied")
    with engine.connect() as c:
        placed = c.execute(
            text(
                "SELECT order_id::text, count(*) FROM order_transitions WHERE from_status IS NULL"
                " AND order_id = ANY(CAST(:o AS uuid[])) GROUP BY 1"
            ),
            {"o": orders},
        ).all()
        inbox = c.execute(
            text("SELECT count(*) FROM inbox WHERE consumer = 'orders' AND message_id LIKE :p"), {"p": f"br-{run}-%"}
        ).scalar()
    assert sorted(n for _, n in placed) == [1, 1, 1] and inbox == 3  # each applied once, the copy a duplicate

    page.get_by_role("searchbox", name="find an order").fill(orders[0])
    page.get_by_role("searchbox", name="find an order").press("Enter")
    page.wait_for_url(f"{stack.url}/console/orders/{orders[0]}")
    rows = page.locator("section", has=page.get_by_role("heading", name="Transitions")).locator("tbody tr")
    assert rows.count() == 1 and "∅ → pending" in rows.first.inner_text() and f"br-{run}-0" in rows.first.inner_text()
    _shot(page, "console-order.png")

    page.goto(f"{stack.url}/console/dead-letters/messages/xss-{run}")
    body = page.locator("pre.body")
    assert body.inner_text() == "<script>alert('owned')</script>"  # shown as text, never run
    assert page.problems == []  # no dialog opened, no CSP violation


def test_the_glance_page_refreshes_itself_without_breaking_its_policy(browser, stack, page):
    _sign_in(page, stack)
    with page.expect_response(lambda r: r.url.endswith("/console/glance") and r.status == 200, timeout=10_000):
        pass  # htmx asks for the fragment every console.refresh_seconds (1 s here)
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()
    expect(page.get_by_text("orders.dead-letter").first).to_be_visible()
    _shot(page, "console-glance.png")
    assert page.problems == []  # a CSP violation is a console error


def test_docs_and_redoc_render_the_operations_with_the_network_cut_off(browser, stack, page, offline):
    page.goto(stack.url + "/docs")
    page.locator(".opblock-summary-path", has_text="/orders/{order_id}/history").wait_for(timeout=20_000)
    assert page.locator(".opblock").count() >= 6
    page.goto(stack.url + "/redoc")
    page.get_by_role("heading", name="Place an order").wait_for(timeout=20_000)
    expect(page.get_by_role("heading", name="An order's whole story (admins)")).to_be_visible()
    assert offline == []  # nothing was even tried elsewhere: no CDN, no fonts, no validator badge
