"""The console's pages and actions under ``/console`` (admins only; off unless ``console_enabled``).

Pages are GETs that only read: PostgreSQL (the orders, the history, the
dead-letter index) and, for the glance, one passive declare per queue.  A
page never reads the dead-letter queue itself; it may ask the process's
:class:`DeadLetterIndexer` to do so in the background.  Actions are POSTs
with the session's CSRF token: a replay or purge is first previewed (the
live queue read, the same order facts and advice as ``orders dlq show``),
the ids shown are kept in ``console_previews``, and the confirmation acts on
exactly those, through :mod:`worker.dlq.operations` (the CLI's code, which
writes the ``dlq_audit`` trail with the admin's name).

Every answer carries a strict Content-Security-Policy (scripts and styles
from this origin only, no inline ones), ``X-Frame-Options: DENY``,
``no-referrer`` and ``no-store``; templates are autoescaped.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import structlog
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import ChainableUndefined, Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine, func, insert, select, text, update
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from schema.tables import console_previews
from worker import status as service_status
from worker.dlq import audit as dlq_audit
from worker.dlq import index as dlq_index
from worker.dlq import operations as dlq
from worker.dlq.order_facts import advice, order_facts
from worker.errors import BrokerError
from worker.settings import Settings
from worker.shim.console import session, views
from worker.shim.console.session import LoginError, Operator
from worker.shim.context import ShimDep
from worker.shim.errors import ApiError

log = structlog.get_logger("worker.shim.console")

#: every console answer: no script or style but this origin's files, no framing, nothing cached or referred
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Chromium send "Origin: null" on our own forms
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: messages of a group per page
PAGE_SIZE = 50
#: dead letters whose order facts a preview shows in full (the others are counted)
PREVIEW_FACTS = 50
#: how long a preview may be confirmed
PREVIEW_MINUTES = 15
#: orders a search by user lists
SEARCH_LIMIT = 50


def _finalize(value: Any) -> Any:
    """Every value a template prints: card-number-like digits masked, whatever a dead letter or an error holds
    (markup the templates made themselves, already printed through here, is left alone)."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return views.mask_cards(value)
    return value


TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(default=True, default_for_string=True),
    # a record written before one of its fields existed shows the field empty, not a 500
    undefined=ChainableUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=_finalize,
)
TEMPLATES.filters["when"] = views.when
TEMPLATES.filters["ago"] = views.ago


class Refusal(Exception):
    """A console request answered with a page saying why (401, 403, 404, 409, 410)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(**context), status)


class ConsoleRoute(APIRoute):
    """Console routes: a :class:`Refusal` becomes its page, and every answer gets the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def secured(request: Request) -> Response:
            try:
                response = await handler(request)
            except Refusal as exc:
                response = page("refusal.html", exc.status, title=exc.title, message=exc.message, me=None)
            except (RequestValidationError, StarletteHTTPException):
                raise  # the app's answers to a malformed request
            except Exception as exc:  # noqa: BLE001 - an HTML page with the console's headers, never a traceback
                log.error("console error", path=request.url.path, exc_info=exc)
                message = "Something failed on the server (the log says what); nothing more was done."
                response = page("refusal.html", 500, title="Error", message=message, me=None)
            response.headers.update(SECURITY_HEADERS)
            return response

        return secured


router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)


class DeadLetterIndexer:
    """Keeps the dead-letter index fresh while someone looks, from one background thread per process.

    A page calls :meth:`poke`: when the last check is older than
    ``console.dead_letter_index_seconds`` (or ``force``), a thread runs
    :func:`worker.dlq.operations.refresh_index` (a passive declare; a read of
    the queue only when it changed).  The page never waits for it.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self.every = settings.console.dead_letter_index_seconds
        self._lock = threading.Lock()
        self._running = False
        self._checked = float("-inf")
        #: the settled minutes of the glance page's last hour, read once by this process
        self.minutes = service_status.MinuteCache()

    @property
    def running(self) -> bool:
        return self._running

    def poke(self, force: bool = False) -> None:
        with self._lock:
            if self._running or (not force and time.monotonic() - self._checked < self.every):
                return
            self._running = True
        threading.Thread(target=self._refresh, args=(force,), name="dead-letter-index", daemon=True).start()

    def _refresh(self, force: bool) -> None:
        try:
            dlq.refresh_index(self.settings, self.engine, force)
        except Exception as exc:  # noqa: BLE001 - said on the page; the index stays as it was
            log.warning("dead-letter index not refreshed", error=f"{type(exc).__name__}: {exc}")
            try:
                dlq_index.note_error(self.engine, f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001, S110 - PostgreSQL away too: nothing to record it in
                pass
        finally:
            self._checked = time.monotonic()
            self._running = False


def indexer(request: Request) -> DeadLetterIndexer:
    return request.app.state.console_indexer  # type: ignore[no-any-return]


IndexerDep = Annotated[DeadLetterIndexer, Depends(indexer)]


# -- who is asking ----------------------------------------------------------------------------------


async def enabled(s: ShimDep) -> None:
    if not s.settings.console_enabled:
        raise Refusal(404, "Not found", "The console is switched off (console.enabled).")


async def operator(request: Request, s: ShimDep, _on: Annotated[None, Depends(enabled)]) -> Operator:
    """The admin asking: by session cookie, or by an admin bearer token; a page saying why otherwise."""
    cookie = request.cookies.get(session.cookie_name(s.settings))
    if cookie:
        try:
            return session.read_session(s.settings, cookie)
        except LoginError as exc:
            raise Refusal(
                403 if "admins" in str(exc) else 401,
                "Not signed in",
                f"{exc}. Run `orders console login --user NAME` and open the link it prints.",
            ) from None
    authorization = request.headers.get("authorization")
    if authorization:
        try:
            principal = s.auth.principal(authorization)
        except ApiError as exc:
            raise Refusal(401, "Not signed in", exc.message) from None
        if not principal.is_admin:
            raise Refusal(403, "Admins only", "The console is for admins; this token is a user's.")
        return Operator(principal.user_id, None)
    raise Refusal(
        401,
        "Not signed in",
        "Run `orders console login --user NAME` on a host with the service's configuration "
        "and open the link it prints (it works once, for a few minutes).",
    )


Me = Annotated[Operator, Depends(operator)]


async def form_of(request: Request) -> dict[str, list[str]]:
    """A POST's urlencoded form (the only kind the console sends)."""
    body = await request.body()
    if not body:
        return {}
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Refusal(415, "Unsupported form", "The console's actions are HTML forms.")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def _one(form: dict[str, list[str]], name: str) -> str:
    values = form.get(name) or [""]
    return values[0]


async def checked_form(request: Request, s: ShimDep, me: Me) -> dict[str, list[str]]:
    """The form of an action, refused unless it carries the session's CSRF token and comes from this site."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise Refusal(403, "Refused", "This action came from another site.")
    form = await form_of(request)
    token = _one(form, "csrf_token") or request.headers.get("x-csrf-token")
    if not session.csrf_ok(s.settings, me, token):
        raise Refusal(403, "Refused", "This action carries no valid CSRF token: reload the page and try again.")
    return form


Form = Annotated[dict[str, list[str]], Depends(checked_form)]


def _common(s: Any, me: Operator, section: str) -> dict[str, Any]:
    csrf = session.csrf_token(s.settings, me.session_id) if me.session_id else ""
    return {"me": me, "csrf": csrf, "section": section, "now": datetime.now(UTC)}


# -- signing in and out -------------------------------------------------------------------------------


@router.get("/login/{token}")
async def login_page(token: str, s: ShimDep, _on: Annotated[None, Depends(enabled)]) -> HTMLResponse:
    """The link of ``orders console login``: asks to confirm (a link preview must not use it up)."""
    try:
        user = await run_in_threadpool(session.peek_login, s.engine, token)
    except LoginError as exc:
        raise Refusal(410, "Link not valid", f"{exc}. Run `orders console login` again for a new one.") from None
    return page("login.html", user=user, token=token, me=None)


@router.post("/login")
async def login(request: Request, s: ShimDep, _on: Annotated[None, Depends(enabled)]) -> Response:
    form = await form_of(request)
    try:
        user = await run_in_threadpool(session.redeem_login, s.engine, _one(form, "token"))
        value, lifetime = session.new_session(s.settings, user)
    except LoginError as exc:
        raise Refusal(410, "Link not valid", f"{exc}. Run `orders console login` again for a new one.") from None
    log.info("console sign-in", user=user)
    response = RedirectResponse("/console", 303)
    response.set_cookie(
        session.cookie_name(s.settings),
        value,
        max_age=lifetime,
        path="/",
        httponly=True,
        samesite="strict",
        secure=s.settings.environment != "development",
    )
    return response


@router.post("/logout")
async def logout(s: ShimDep, me: Me, _form: Form) -> Response:
    response = page("refusal.html", title="Signed out", message=f"{me.name} signed out.", me=None)
    response.delete_cookie(
        session.cookie_name(s.settings),
        path="/",
        httponly=True,
        samesite="strict",
        secure=s.settings.environment != "development",
    )
    return response


# -- at a glance ----------------------------------------------------------------------------------------


async def _glance(s: Any, idx: DeadLetterIndexer) -> dict[str, Any]:
    idx.poke()
    report = await run_in_threadpool(service_status.gather, s.settings, s.engine, False, idx.minutes)
    hour = report.get("last_hour")
    charts: dict[str, Any] = {}
    if hour is not None:
        for name in ("applied", "refused", "dead_lettered"):
            charts[name] = views.chart(hour[name], hour["minutes"])
        charts["payments"] = {
            provider: (views.chart(p["calls_per_minute"], hour["minutes"]), p)
            for provider, p in hour["payments"].items()
        }
    return {"report": report, "charts": charts, "refresh": s.settings.console.refresh_seconds}


@router.get("")
async def glance(s: ShimDep, me: Me, idx: IndexerDep) -> HTMLResponse:
    return page("glance.html", **_common(s, me, "glance"), **(await _glance(s, idx)))


@router.get("/glance")
async def glance_fragment(s: ShimDep, me: Me, idx: IndexerDep) -> HTMLResponse:
    """The part of the glance page that refreshes itself (htmx)."""
    return page("_glance.html", **_common(s, me, "glance"), **(await _glance(s, idx)))


# -- dead letters -----------------------------------------------------------------------------------


def _index_view(engine: Engine) -> dict[str, Any]:
    return {"state": dlq_index.state(engine), "totals": dlq_index.totals(engine)}


@router.get("/dead-letters")
async def dead_letters(s: ShimDep, me: Me, idx: IndexerDep) -> HTMLResponse:
    idx.poke()

    def read() -> dict[str, Any]:
        return {
            "groups": dlq_index.groups(s.engine),
            "audit": dlq_audit.history(s.engine, 10),
            **_index_view(s.engine),
        }

    data = await run_in_threadpool(read)
    return page("dead_letters.html", **_common(s, me, "dead-letters"), refreshing=idx.running, **data)


@router.post("/dead-letters/refresh")
async def refresh(me: Me, _form: Form, idx: IndexerDep) -> Response:
    idx.poke(force=True)
    return RedirectResponse("/console/dead-letters", 303)


@router.get("/dead-letters/groups/{key}")
async def group(key: str, s: ShimDep, me: Me, idx: IndexerDep, page_no: int = 1) -> HTMLResponse:
    idx.poke()
    page_no = max(1, page_no)

    def read() -> dict[str, Any]:
        found = dlq_index.groups(s.engine, 1, key)
        rows = dlq_index.group_letters(s.engine, key, (page_no - 1) * PAGE_SIZE, PAGE_SIZE)
        total = found[0]["ids"] if found else 0
        return {"group": found[0] if found else None, "total": total, "letters": rows, **_index_view(s.engine)}

    data = await run_in_threadpool(read)
    if data["group"] is None:
        raise Refusal(404, "No such group", "No dead letter of this group is in the index (replayed, purged or gone).")
    pages = max(1, -(-data["total"] // PAGE_SIZE))
    return page("group.html", **_common(s, me, "dead-letters"), key=key, page_no=page_no, pages=pages, **data)


@router.get("/dead-letters/messages/{letter_id:path}")
async def letter(letter_id: str, s: ShimDep, me: Me) -> HTMLResponse:
    def read() -> dict[str, Any] | None:
        found = dlq_index.letter(s.engine, letter_id)
        if found is None:
            return None
        dl, row = found
        full = dl.full()
        try:
            facts: dict[str, Any] | None = order_facts(s.engine, dl)
        except Exception as exc:  # noqa: BLE001 - the message is still worth showing
            log.warning("order facts not read", error=f"{type(exc).__name__}: {exc}")
            facts = None
        tip = advice(dl, facts) if facts is not None else "Check the order in PostgreSQL before replaying."
        headers = {k: v for k, v in full["headers"].items() if k != "x-error-traceback"}
        return {
            "dl": dl,
            "row": row,
            "properties": views.redact(full["properties"]),
            "headers": views.redact(headers),
            "traceback": views.mask_cards(full["traceback"] or ""),
            "body": views.body_of(dl.delivery.body),
            "facts": views.redact(facts) if facts is not None else None,
            "advice": tip,
        }

    data = await run_in_threadpool(read)
    if data is None:
        raise Refusal(404, "No such dead letter", f"{letter_id!r} is not in the index (replayed, purged or gone).")
    return page("letter.html", **_common(s, me, "dead-letters"), **data)


def _save_preview(engine: Engine, actor: str, action: str, ids: list[str], detail: str) -> str:
    preview_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            console_previews.delete().where(console_previews.c.created_at < func.now() - text("interval '1 day'"))
        )
        conn.execute(
            insert(console_previews).values(id=preview_id, actor=actor, action=action, message_ids=ids, detail=detail)
        )
    return preview_id


def _take_preview(engine: Engine, preview_id: str, actor: str, action: str) -> tuple[list[str], str]:
    """The ids of a preview, used once, by whoever made it, within :data:`PREVIEW_MINUTES`."""
    try:
        uuid.UUID(preview_id)
    except ValueError:
        raise Refusal(404, "No such preview", "Preview the action again.") from None
    since = datetime.now(UTC) - timedelta(minutes=PREVIEW_MINUTES)
    with engine.begin() as conn:
        row = conn.execute(
            update(console_previews)
            .where(
                console_previews.c.id == preview_id,
                console_previews.c.actor == actor,
                console_previews.c.action == action,
                console_previews.c.used_at.is_(None),
                console_previews.c.created_at > since,
            )
            .values(used_at=func.now())
            .returning(console_previews.c.message_ids, console_previews.c.detail)
        ).first()
    if row is None:
        raise Refusal(
            409,
            "Preview not valid",
            f"This preview was used, has expired (after {PREVIEW_MINUTES} minutes) or "
            "is someone else's. Preview the action again.",
        )
    return list(row.message_ids), str(row.detail)


@router.post("/dead-letters/preview")
async def preview(s: ShimDep, me: Me, form: Form) -> HTMLResponse:
    """A replay's dry run or a purge's list: the live queue read, what would move and what happened to each order."""
    action = _one(form, "action")
    if action not in ("replay", "purge"):
        raise Refusal(400, "Unknown action", "Replay or purge.")
    key, ids = _one(form, "group"), [i for i in form.get("ids", []) if i]
    if not key and not ids:
        raise Refusal(400, "Nothing selected", "Select messages, or act on a whole group.")

    def run() -> dict[str, Any]:
        started = time.monotonic()
        letters = dlq.browse(s.settings, dlq.Selection(everything=True))  # the live queue, as `--dry-run` reads it
        dlq_index.store(s.engine, letters, int((time.monotonic() - started) * 1000))  # and the index follows
        wanted = set(ids)
        chosen = [dl for dl in letters if (dl.group == key if key else dl.id in wanted)]
        seen: set[str] = set()
        unique = [dl for dl in chosen if not (dl.id in seen or seen.add(dl.id))]  # type: ignore[func-returns-value]
        shown = []
        for dl in unique[:PREVIEW_FACTS]:
            facts = order_facts(s.engine, dl)
            shown.append(
                {
                    "dl": dl,
                    "misplaced": dlq.misplaced(dl, None) if action == "replay" else None,
                    "facts": views.redact(facts),
                    "advice": advice(dl, facts),
                }
            )
        what = f"group {key}" if key else f"{len(ids)} selected"
        detail = f"{len(chosen)} message(s) ({what}) via the console"
        preview_id = _save_preview(s.engine, me.name, action, [dl.id for dl in unique], detail) if unique else ""
        missing = sorted(wanted - {dl.id for dl in unique}) if not key else []
        return {
            "letters": shown,
            "count": len(chosen),
            "ids": len(unique),
            "missing": missing,
            "preview_id": preview_id,
            "detail": detail,
        }

    try:
        data = await run_in_threadpool(run)
    except BrokerError as exc:
        raise Refusal(503, "Dead-letter queue not read", f"RabbitMQ: {exc}") from None
    return page("preview.html", **_common(s, me, "dead-letters"), action=action, group=key, **data)


@router.post("/dead-letters/replay")
async def replay(s: ShimDep, me: Me, form: Form) -> Response:
    ids, _detail = await run_in_threadpool(_take_preview, s.engine, _one(form, "preview_id"), me.name, "replay")

    def run() -> dlq.Report:
        opts = dlq.ReplayOptions(actor=me.name)
        return dlq.replay(s.settings, s.engine, dlq.Selection(ids=tuple(ids)), opts)

    try:
        report = await run_in_threadpool(run)
    except (BrokerError, ValueError) as exc:
        raise Refusal(503, "Not replayed", f"RabbitMQ: {exc}; nothing or part moved (see the audit trail).") from None
    log.info("console replay", user=me.name, moved=len(report.moved), selected=len(report.selected))
    return RedirectResponse("/console/dead-letters/audit", 303)


@router.post("/dead-letters/purge")
async def purge(s: ShimDep, me: Me, form: Form) -> Response:
    preview_id, typed = _one(form, "preview_id"), _one(form, "confirm").strip()

    def check() -> tuple[list[str], str]:
        with s.engine.connect() as conn:
            count = (
                conn.execute(
                    select(func.jsonb_array_length(console_previews.c.message_ids)).where(
                        console_previews.c.id == preview_id
                    )
                ).scalar()
                if _is_uuid(preview_id)
                else None
            )
        if count is None or typed != str(count):
            raise Refusal(
                409, "Not purged", f"Type the number of messages ({count if count is not None else '?'}) to purge them."
            )
        return _take_preview(s.engine, preview_id, me.name, "purge")

    ids, _detail = await run_in_threadpool(check)

    def run() -> dlq.Report:
        return dlq.purge(s.settings, s.engine, dlq.Selection(ids=tuple(ids)), me.name, only_ids=set(ids))

    try:
        report = await run_in_threadpool(run)
    except BrokerError as exc:
        raise Refusal(503, "Not purged", f"RabbitMQ: {exc}; nothing or part purged (see the audit trail).") from None
    log.info("console purge", user=me.name, purged=len(report.moved))
    return RedirectResponse("/console/dead-letters/audit", 303)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@router.get("/dead-letters/audit")
async def audit(s: ShimDep, me: Me) -> HTMLResponse:
    rows = await run_in_threadpool(dlq_audit.history, s.engine, 100)
    return page("audit.html", **_common(s, me, "dead-letters"), rows=rows)


# -- orders ---------------------------------------------------------------------------------------------------


_BY_USER = text(
    "SELECT order_id::text AS order_id, status, total, currency, created_at FROM orders"
    " WHERE user_id = :q ORDER BY created_at DESC LIMIT :limit"
)
_BY_PAYMENT = text(
    "SELECT o.order_id::text AS order_id, o.status, o.total, o.currency, o.created_at FROM payments p"
    " JOIN orders o USING (order_id) WHERE p.provider_payment_id = :q OR p.capture_id = :q OR p.refund_id = :q"
    " LIMIT :limit"
)


def search(engine: Engine, q: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(an order id to open, or None; orders found): by order id, by user id, else by payment id."""
    q = q.strip()
    if _is_uuid(q):
        oid = str(uuid.UUID(q))
        with engine.connect() as conn:
            if conn.execute(text("SELECT 1 FROM orders WHERE order_id = CAST(:o AS uuid)"), {"o": oid}).first():
                return oid, []
        return None, []
    with engine.connect() as conn:
        # a user first (an index); only then the payments (no index of theirs on the worker's write path)
        found = [dict(r) for r in conn.execute(_BY_USER, {"q": q, "limit": SEARCH_LIMIT}).mappings()]
        if found:
            return None, found
        found = [dict(r) for r in conn.execute(_BY_PAYMENT, {"q": q, "limit": SEARCH_LIMIT}).mappings()]
    return (found[0]["order_id"] if len(found) == 1 else None), found


@router.get("/orders")
async def orders(s: ShimDep, me: Me, q: str = "") -> Response:
    q = q[:200]
    target, found = (None, []) if not q.strip() else await run_in_threadpool(search, s.engine, q)
    if target is not None:
        return RedirectResponse(f"/console/orders/{target}", 303)
    return page("orders.html", **_common(s, me, "orders"), q=q, found=found)


@router.get("/orders/{order_id}")
async def story(order_id: str, s: ShimDep, me: Me) -> HTMLResponse:
    """An order's story, as ``GET /orders/{id}/history`` and ``orders show`` give it, and its dead letters."""
    from worker.history import order_story

    if not _is_uuid(order_id):
        raise Refusal(404, "No such order", f"{order_id!r} is not an order id.")
    oid = str(uuid.UUID(order_id))

    def read() -> tuple[dict[str, Any] | None, list[dict[str, Any]], dlq_index.IndexState]:
        found = order_story(s.engine, oid)
        return found, dlq_index.for_order(s.engine, oid), dlq_index.state(s.engine)

    found, letters, state = await run_in_threadpool(read)
    if found is None:
        raise Refusal(404, "No such order", f"There is no order {oid}.")
    return page("story.html", **_common(s, me, "orders"), story=views.redact(found), letters=letters, state=state, q="")
