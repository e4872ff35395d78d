"""Bearer tokens: a verified token is remembered only until it expires, a bad one never."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from worker.settings import load_settings
from worker.shim import auth
from worker.shim.errors import ApiError

CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
SECRET = "unit-test-secret-of-at-least-32-bytes!!"


@pytest.fixture
def authenticator() -> auth.Authenticator:
    cfg = load_settings(CONFIG, environ={"ORDERS_SHIM__JWT_SECRET": SECRET}).shim
    return auth.Authenticator(cfg)


def bearer(claims: dict[str, object], key: str = SECRET) -> str:
    return "Bearer " + jwt.encode(claims, key, algorithm="HS256")


def test_a_remembered_token_is_refused_once_it_expires(authenticator, monkeypatch):
    monkeypatch.setattr(auth, "LEEWAY_SECONDS", 0)
    token = bearer({"sub": "ann", "roles": ["admin"], "exp": int(time.time()) + 2})
    first = authenticator.principal(token)
    assert first == auth.Principal("ann", ("admin",))
    with monkeypatch.context() as m:  # the second call is served from memory: no second signature check
        m.setattr(auth.jwt, "decode", lambda *a, **k: pytest.fail("verified twice"))
        assert authenticator.principal(token) is first
    time.sleep(max(0.0, int(time.time()) + 2 - time.time()) + 1.1)
    with pytest.raises(ApiError) as refused:
        authenticator.principal(token)
    assert refused.value.status == 401


def test_a_token_that_failed_is_checked_again_every_time(authenticator):
    forged = bearer({"sub": "ann", "exp": int(time.time()) + 60}, key="someone-elses-key-of-32-bytes-long!!")
    for _ in range(2):
        with pytest.raises(ApiError) as refused:
            authenticator.principal(forged)
        assert refused.value.status == 401


def test_the_memory_stays_bounded(authenticator, monkeypatch):
    monkeypatch.setattr(auth, "CACHE_SIZE", 10)
    exp = int(time.time()) + 60
    for i in range(25):
        authenticator.principal(bearer({"sub": f"user-{i}", "exp": exp}))
    assert len(authenticator._verified) <= 10
