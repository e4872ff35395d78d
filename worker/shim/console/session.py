"""Who may use the console: one-time login links, session cookies and CSRF tokens.

``orders console login --user NAME`` stores the SHA-256 of a random link
token in ``console_logins`` (the link itself is printed, never stored) with a
short expiry.  Redeeming it is one guarded ``UPDATE … WHERE used_at IS NULL
AND expires_at > now() RETURNING``: whichever shim process gets the link,
it works once.

A redeemed link becomes a session: a JWT (HS256 with
``console.session_secret``, audience ``orders-console``) naming the admin, its
``roles`` (``admin``), a random session id and an expiry, kept in an
``HttpOnly``, ``SameSite=Strict`` cookie (``Secure``, under the ``__Host-``
prefix, unless in development).  Every action is a POST carrying a CSRF
token: an HMAC of the session id under the same secret, so it needs no
storage and is worthless with any other session.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
from sqlalchemy import Engine, delete, insert, select, update

from schema.tables import console_logins
from worker.settings import Settings

#: the audience of a console session's JWT: a bearer token of the API is not a session, nor the reverse
AUDIENCE = "orders-console"
#: the cookie in development (plain http on localhost); production uses the __Host- prefixed one,
#: which browsers only accept Secure, from the host itself, for the whole site
DEV_COOKIE = "orders-console"
SECURE_COOKIE = "__Host-orders-console"
#: a console user name: the rule of a JWT subject (worker/shim/auth.py)
USER_NAME = re.compile(r"[A-Za-z0-9._@:|+-]{1,200}")
#: link tokens: 32 random bytes, URL-safe
TOKEN_BYTES = 32


class LoginError(Exception):
    """A login link that is unknown, used already or expired (the same answer for all three)."""


@dataclass(frozen=True)
class Operator:
    """A console user: an admin by session cookie, or by an admin bearer token (``session_id`` None)."""

    name: str
    session_id: str | None


def cookie_name(settings: Settings) -> str:
    return DEV_COOKIE if settings.environment == "development" else SECURE_COOKIE


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_login(engine: Engine, user: str, ttl_seconds: int) -> str:
    """A new one-time link token for ``user`` (expired links are cleared on the way)."""
    if not USER_NAME.fullmatch(user):
        raise ValueError(f"{user!r} is not a user name (letters, digits and ._@:|+- only, at most 200)")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(delete(console_logins).where(console_logins.c.expires_at < now - timedelta(days=1)))
        conn.execute(
            insert(console_logins).values(
                token_hash=_digest(token), user_name=user, expires_at=now + timedelta(seconds=ttl_seconds)
            )
        )
    return token


def peek_login(engine: Engine, token: str) -> str:
    """The user a link would sign in, without using it; :class:`LoginError` when it cannot be used."""
    now = datetime.now(UTC)
    with engine.connect() as conn:
        user = conn.execute(
            select(console_logins.c.user_name).where(
                console_logins.c.token_hash == _digest(token),
                console_logins.c.used_at.is_(None),
                console_logins.c.expires_at > now,
            )
        ).scalar()
    if user is None:
        raise LoginError("this login link is unknown, was used already or has expired")
    return str(user)


def redeem_login(engine: Engine, token: str) -> str:
    """Use a link (once, whichever process asks); the user it signs in, or :class:`LoginError`."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        user = conn.execute(
            update(console_logins)
            .where(
                console_logins.c.token_hash == _digest(token),
                console_logins.c.used_at.is_(None),
                console_logins.c.expires_at > now,
            )
            .values(used_at=now)
            .returning(console_logins.c.user_name)
        ).scalar()
    if user is None:
        raise LoginError("this login link is unknown, was used already or has expired")
    return str(user)


def _key(settings: Settings) -> bytes:
    secret = settings.console.session_secret.get_secret_value()
    if not secret:  # an empty HMAC key would let anyone mint a session
        raise LoginError("console.session_secret is not set: the console cannot hold sessions")
    return secret.encode()


def new_session(settings: Settings, user: str) -> tuple[str, int]:
    """(the session cookie's value, its lifetime in seconds) for ``user``."""
    lifetime = settings.console.session_minutes * 60
    now = int(time.time())
    claims = {
        "sub": user,
        "roles": ["admin"],
        "sid": uuid.uuid4().hex,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + lifetime,
    }
    return jwt.encode(claims, _key(settings), algorithm="HS256"), lifetime


def read_session(settings: Settings, value: str) -> Operator:
    """The operator of a session cookie; :class:`LoginError` for anything but a valid admin session."""
    try:
        claims = jwt.decode(
            value,
            _key(settings),
            algorithms=["HS256"],
            audience=AUDIENCE,
            options={"require": ["exp", "sub", "sid", "aud"]},
        )
    except jwt.PyJWTError:
        raise LoginError("no valid console session") from None
    sub, sid, roles = claims.get("sub"), claims.get("sid"), claims.get("roles")
    if not isinstance(sub, str) or not USER_NAME.fullmatch(sub) or not isinstance(sid, str):
        raise LoginError("no valid console session")
    if not isinstance(roles, list) or "admin" not in roles:
        raise LoginError("the console is for admins")
    return Operator(sub, sid)


def csrf_token(settings: Settings, session_id: str) -> str:
    """The CSRF token of a session: HMAC-SHA256 of its id."""
    return hmac.new(_key(settings), b"csrf:" + session_id.encode(), hashlib.sha256).hexdigest()


def csrf_ok(settings: Settings, operator: Operator, token: str | None) -> bool:
    """Whether a POST's token belongs to the operator's session (bearer callers need none: a browser
    never sends an ``Authorization`` header of its own accord)."""
    if operator.session_id is None:
        return True
    return bool(token) and hmac.compare_digest(csrf_token(settings, operator.session_id), token or "")


def login_url(settings: Settings, token: str) -> str:
    """The link ``orders console login`` prints."""
    base = settings.console.public_url.rstrip("/")
    if not base:
        host = settings.shim.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        base = f"http://{host}:{settings.shim.port}"
    return f"{base}/console/login/{token}"
