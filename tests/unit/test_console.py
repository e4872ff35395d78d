"""The console's pieces that need no server: its settings and production rules, sessions and CSRF tokens,
redaction, grouping of dead letters, charts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from worker.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "config.yaml"
GOOD_SECRET = "a-console-session-secret-of-at-least-32-bytes!"


def settings(**env: str) -> Any:
    return load_settings(CONFIG, {f"ORDERS_{k.upper()}": v for k, v in env.items()})


def test_the_console_is_on_in_development_and_off_in_production_until_set():
    assert settings(environment="development").console_enabled
    assert not settings(environment="production").console_enabled
    assert settings(environment="production", console__enabled="true").console_enabled
    assert not settings(environment="development", console__enabled="false").console_enabled


def test_production_refuses_a_console_without_a_secret_of_its_own_or_over_plain_http():
    from worker.production import problems

    real = {
        "shim__jwt_secret": "j" * 40,
        "shim__id_secret": "i" * 40,
        "stripe__api_key": "sk_live_" + "x" * 20,
        "stripe__webhook_secret": "whsec_" + "x" * 20,
        "stripe__api_base": "https://api.stripe.com",
        "paypal__client_id": "client",
        "paypal__client_secret": "s" * 20,
        "paypal__webhook_id": "WH-1",
        "paypal__base_url": "https://api-m.paypal.com",
        "rabbitmq__url": "amqp://orders:pw@rabbit:5672/",
    }
    assert problems(settings(environment="production", **real)) == []  # off: nothing to check
    keys = [p.key for p in problems(settings(environment="production", console__enabled="true", **real))]
    assert keys == ["console.session_secret"]  # the shipped development value
    short = settings(environment="production", console__enabled="true", console__session_secret="short", **real)
    assert [p.message for p in problems(short)] == ["is shorter than 32 bytes"]
    ok = settings(environment="production", console__enabled="true", console__session_secret=GOOD_SECRET, **real)
    assert problems(ok) == []
    http = settings(
        environment="production",
        console__enabled="true",
        console__session_secret=GOOD_SECRET,
        console__public_url="http://ops.example",
        **real,
    )
    assert [p.key for p in problems(http)] == ["console.public_url"]
    shared = settings(
        environment="production", console__enabled="true", console__session_secret=real["shim__jwt_secret"], **real
    )
    assert [p.key for p in problems(shared)] == ["console.session_secret"]  # one key, one purpose


def test_a_session_is_an_admin_jwt_of_the_console_and_its_csrf_token_fits_it_alone():
    from worker.shim.console import session

    s = settings(environment="development", console__session_secret=GOOD_SECRET)
    value, lifetime = session.new_session(s, "ops")
    assert lifetime == 480 * 60
    me = session.read_session(s, value)
    assert me.name == "ops" and me.session_id
    token = session.csrf_token(s, me.session_id)
    assert session.csrf_ok(s, me, token)
    assert not session.csrf_ok(s, me, None) and not session.csrf_ok(s, me, "0" * 64)
    other = session.read_session(s, session.new_session(s, "ops")[0])
    assert not session.csrf_ok(s, other, token)  # another session's token

    def forged(**claims: Any) -> str:
        base = {"sub": "eve", "roles": ["admin"], "sid": "x", "aud": session.AUDIENCE, "exp": int(time.time()) + 60}
        return jwt.encode({**base, **claims}, GOOD_SECRET, algorithm="HS256")

    with pytest.raises(session.LoginError, match="admins"):
        session.read_session(s, forged(roles=["user"]))
    with pytest.raises(session.LoginError):
        session.read_session(s, forged(aud="orders-api"))  # an API token is not a session
    with pytest.raises(session.LoginError):
        session.read_session(s, forged(exp=int(time.time()) - 60))
    with pytest.raises(session.LoginError):
        session.read_session(settings(environment="development", console__session_secret=""), value)


def test_the_login_link_names_the_shim_as_the_browser_reaches_it():
    from worker.shim.console.session import cookie_name, login_url

    assert login_url(settings(shim__host="0.0.0.0", shim__port="8000"), "T") == "http://127.0.0.1:8000/console/login/T"
    assert login_url(settings(console__public_url="https://ops.example/"), "T") == "https://ops.example/console/login/T"
    assert cookie_name(settings(environment="production")) == "__Host-orders-console"
    assert cookie_name(settings(environment="development")) == "orders-console"


def test_error_messages_that_differ_only_in_ids_and_numbers_are_one_group():
    from worker.dlq.letters import error_pattern, group_key

    a = error_pattern("unknown product sku-12 in order 1b4e28ba-2fa1-11d2-883f-0016d3cca427 (pi_3NkTestAbc123XYZ)")
    b = error_pattern("unknown product sku-977 in order 7c9e6679-7425-40de-944b-e07fc1f90ae7 (pi_9ZZZtest00000001)")
    assert a == b == "unknown product sku-<n> in order <uuid> (<id>)"
    assert group_key("orders.place", "Refused", a) == group_key("orders.place", "Refused", b)
    assert group_key("orders.cancel", "Refused", a) != group_key("orders.place", "Refused", a)
    assert error_pattern("PayPal order 5O190127TN364715T:\n  gone") == "PayPal order <id>: gone"


def test_secrets_and_card_numbers_never_reach_a_page():
    from worker.shim.console.views import body_of, mask_cards, redact

    shown = redact(
        {
            "next_action": {"client_secret": "pi_3Nk_secret_abcdefghijklmnopqrstuvwxyz"},
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
            "headers": {"Authorization": "Bearer eyJhbGciOi.payload.signature"},
            "note": "card 4111 1111 1111 1111, order 1234567890123",
        }
    )
    text = str(shown)
    assert "abcdefghijklmnop" not in text and "pm_card_visa" not in text and "payload.signature" not in text
    assert "4111 1111 1111 1111" not in text and "••••1111" in text
    assert "1234567890123" in text  # not a card number (Luhn), kept
    assert mask_cards("4242424242424242") == "••••4242"
    assert body_of(b'{"payment": {"payment_method": "pm_card_visa"}}').kind == "json"
    assert "pm_card_visa" not in body_of(b'{"payment": {"payment_method": "pm_card_visa"}}').text
    assert body_of(b"<script>x</script>") == body_of(b"<script>x</script>")  # text, escaped by the template
    assert body_of(b"<script>x</script>").kind == "text"
    assert body_of(b"\xff\xfe\x00").kind == "bytes"


def test_a_chart_scales_its_bars_to_the_busiest_minute():
    from worker.shim.console.views import chart

    c = chart([0, 5, 10], ["2026-12-03T10:00:00+00:00", "2026-12-03T10:01:00+00:00", "2026-12-03T10:02:00+00:00"])
    assert [b.height for b in c.bars] == [0, 24, 48] and c.peak == 10 and c.total == 15
    assert c.bars[2].y == 0 and c.bars[1].label == "10:01"
    assert chart([0, 0], []).peak == 0


def test_a_selection_of_thousands_of_ids_matches_by_set():
    from datetime import UTC, datetime

    from worker.dlq.letters import DeadLetter
    from worker.dlq.operations import Selection
    from worker.rabbit.connection import Delivery

    ids = tuple(f"m-{i}" for i in range(5000))
    selection = Selection(ids=ids)

    def letter(mid: str) -> DeadLetter:
        return DeadLetter.from_delivery(
            Delivery(0, "", "", "orders.dead-letter", b"{}", mid, "PlaceOrder", None, None, None, {}, False)
        )

    now = datetime.now(UTC)
    assert selection.matches(letter("m-4999"), now) and not selection.matches(letter("m-5000"), now)


def test_package_data_ships_every_static_file_and_template():
    """A non-editable install (the Docker image) must serve /static, /docs, /redoc and the console's pages."""
    import configparser
    from fnmatch import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    data = {pkg: [p.strip() for p in globs.split(",")] for pkg, globs in cfg["options.package_data"].items()}
    for pkg, folder in (("worker.shim", "static"), ("worker.shim.console", "templates")):
        base = ROOT / pkg.replace(".", "/")
        files = [p.relative_to(base).as_posix() for p in (base / folder).rglob("*") if p.is_file()]
        assert files
        # setuptools' globs do not cross "/": each file must match one at its own depth
        missing = [f for f in files if not any(fnmatch(f, g) and f.count("/") == g.count("/") for g in data[pkg])]
        assert missing == [], f"not in setup.cfg's package_data for {pkg}: {missing}"
