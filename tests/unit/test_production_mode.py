"""Production mode: the shipped development configuration cannot run in production.

The service is in production unless told otherwise; there it refuses empty
or development secrets, short HMAC keys and hosts that are not the payment
providers' (worker.production), and the CLI's long-running commands exit 1
naming the key and its variable.  These tests need no server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from worker import production
from worker.settings import SettingsError, load_settings
from worker.shim.auth import Authenticator
from worker.shim.errors import ApiError

CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
ORDERS = str(Path(sys.executable).parent / "orders")
GOOD_SECRET = "a-production-secret-of-more-than-32-bytes-0123456789"

#: a configuration production mode accepts: every secret the operator's own, every URL the provider's
PRODUCTION_ENV = {
    "ORDERS_RABBITMQ__URL": "amqp://orders-service:s3cret-broker-password@rabbit.internal:5672/orders",
    "ORDERS_SHIM__JWT_SECRET": GOOD_SECRET,
    "ORDERS_SHIM__ID_SECRET": GOOD_SECRET + "-ids",
    "ORDERS_STRIPE__API_KEY": "sk_live_0123456789abcdef",
    "ORDERS_STRIPE__WEBHOOK_SECRET": "whsec_0123456789abcdef0123456789",
    "ORDERS_STRIPE__API_BASE": "https://api.stripe.com",
    "ORDERS_PAYPAL__CLIENT_ID": "AZ-live-client-id",
    "ORDERS_PAYPAL__CLIENT_SECRET": "EL-live-client-secret",
    "ORDERS_PAYPAL__WEBHOOK_ID": "8PT597110X687430LKGECATA",
    "ORDERS_PAYPAL__BASE_URL": "https://api-m.paypal.com",
    "ORDERS_PAYPAL__CERT_HOST_ALLOWLIST": '["api.paypal.com", "api.sandbox.paypal.com"]',
}


def refused_keys(environ: dict[str, str]) -> set[str]:
    return {p.key for p in production.problems(load_settings(CONFIG, environ=environ))}


def test_the_shipped_configuration_is_refused_in_production_and_production_is_the_default():
    settings = load_settings(CONFIG, environ={})
    assert settings.environment == "production"
    keys = {p.key for p in production.problems(settings)}
    assert {
        "shim.jwt_secret",
        "shim.id_secret",
        "stripe.api_key",
        "stripe.webhook_secret",
        "paypal.client_secret",
        "stripe.api_base",
        "paypal.base_url",
        "rabbitmq.url",
    } <= keys


def test_development_mode_checks_nothing():
    assert refused_keys({"ORDERS_ENVIRONMENT": "development"}) == set()


def test_a_configuration_of_real_secrets_and_provider_urls_passes():
    assert refused_keys(PRODUCTION_ENV) == set()


@pytest.mark.parametrize(
    "override, key",
    [
        ({"ORDERS_SHIM__JWT_SECRET": "short-but-not-empty"}, "shim.jwt_secret"),
        ({"ORDERS_SHIM__JWT_SECRET": ""}, "shim.jwt_secret"),
        ({"ORDERS_SHIM__JWT_SECRET": "change-me-in-production"}, "shim.jwt_secret"),
        ({"ORDERS_SHIM__ID_SECRET": ""}, "shim.id_secret"),
        ({"ORDERS_SHIM__WEBHOOK_HMAC_SECRET": "too-short"}, "shim.webhook_hmac_secret"),
        ({"ORDERS_STRIPE__API_KEY": "sk_test_local_fake"}, "stripe.api_key"),
        ({"ORDERS_STRIPE__API_BASE": "http://api.stripe.com"}, "stripe.api_base"),
        ({"ORDERS_STRIPE__API_BASE": "https://stripe.attacker.example"}, "stripe.api_base"),
        ({"ORDERS_PAYPAL__BASE_URL": "http://127.0.0.1:12112"}, "paypal.base_url"),
        ({"ORDERS_PAYPAL__CERT_HOST_ALLOWLIST": '["api.paypal.com", "127.0.0.1"]'}, "paypal.cert_host_allowlist"),
        ({"ORDERS_RABBITMQ__URL": "amqp://guest:guest@rabbit.internal:5672/"}, "rabbitmq.url"),
        ({"ORDERS_PAYPAL__CERT_CA_FILE": "/etc/ssl/certs/my-own-ca.pem"}, "paypal.cert_ca_file"),
        ({"ORDERS_SHIM__TRUSTED_PROXIES": '["10.0.0.0/8", "0.0.0.0/0"]'}, "shim.trusted_proxies"),
        # RabbitMQ percent-decodes the user info: these log in as guest
        ({"ORDERS_RABBITMQ__URL": "amqp://%67uest:s3cret-broker-password@rabbit.internal:5672/"}, "rabbitmq.url"),
        ({"ORDERS_RABBITMQ__URL": "amqp://orders-service:%67%75est@rabbit.internal:5672/"}, "rabbitmq.url"),
        # no single /0, but together every address
        ({"ORDERS_SHIM__TRUSTED_PROXIES": '["0.0.0.0/1", "128.0.0.0/1"]'}, "shim.trusted_proxies"),
        ({"ORDERS_SHIM__TRUSTED_PROXIES": '["10.0.0.0/8", "::/1", "8000::/1"]'}, "shim.trusted_proxies"),
        ({"ORDERS_SHIM__TRUSTED_PROXIES": '["::ffff:0:0/97", "::ffff:128.0.0.0/97"]'}, "shim.trusted_proxies"),
        # test money, without payments.mode: test
        ({"ORDERS_STRIPE__API_KEY": "sk_test_51Hxxxxxxxxxxxxxxxx"}, "stripe.api_key"),
        ({"ORDERS_STRIPE__API_KEY": "rk_test_51Hxxxxxxxxxxxxxxxx"}, "stripe.api_key"),
        ({"ORDERS_STRIPE__API_KEY": "pk_test_51Hxxxxxxxxxxxxxxxx"}, "stripe.api_key"),
        ({"ORDERS_STRIPE__API_KEY": "pk_live_51Hxxxxxxxxxxxxxxxx"}, "stripe.api_key"),  # publishable: no secret
        ({"ORDERS_PAYPAL__BASE_URL": "https://api-m.sandbox.paypal.com"}, "paypal.base_url"),
        ({"ORDERS_PAYPAL__BASE_URL": "https://api.sandbox.paypal.com"}, "paypal.base_url"),
        # a captured webhook replayable for ten years
        ({"ORDERS_SHIM__WEBHOOK_TOLERANCE_SECONDS": "315360000"}, "shim.webhook_tolerance_seconds"),
        ({"ORDERS_STRIPE__WEBHOOK_TOLERANCE_SECONDS": "601"}, "stripe.webhook_tolerance_seconds"),
        ({"ORDERS_SHIM__MAX_HEADER_BYTES": str(10 * 1024 * 1024)}, "shim.max_header_bytes"),
        ({"ORDERS_SHIM__MAX_BODY_BYTES": str(1024**3)}, "shim.max_body_bytes"),
        ({"ORDERS_SHIM__ID_SECRET": GOOD_SECRET}, "shim.id_secret"),  # the same key as jwt_secret
        ({"ORDERS_SHIM__WEBHOOK_HMAC_SECRET": GOOD_SECRET}, "shim.webhook_hmac_secret"),
        ({"ORDERS_PAYPAL__CERT_HOST_ALLOWLIST": '["api.paypal.com:8443"]'}, "paypal.cert_host_allowlist"),
    ],
)
def test_each_unsafe_setting_is_refused_by_name(override, key):
    assert refused_keys({**PRODUCTION_ENV, **override}) == {key}


@pytest.mark.parametrize(
    "override",
    [
        {"ORDERS_SHIM__TRUSTED_PROXIES": '["0.0.0.0/1", "10.0.0.0/8", "::1/128", "fd00::/8"]'},
        {"ORDERS_SHIM__WEBHOOK_TOLERANCE_SECONDS": "600", "ORDERS_STRIPE__WEBHOOK_TOLERANCE_SECONDS": "600"},
        {"ORDERS_SHIM__MAX_HEADER_BYTES": str(64 * 1024), "ORDERS_SHIM__MAX_BODY_BYTES": str(1024 * 1024)},
        {"ORDERS_STRIPE__API_KEY": "rk_live_51Hxxxxxxxxxxxxxxxx"},
        {"ORDERS_PAYPAL__CERT_HOST_ALLOWLIST": '["api.paypal.com:443", "api-m.paypal.com"]'},
    ],
)
def test_sane_values_near_the_limits_pass(override):
    assert refused_keys({**PRODUCTION_ENV, **override}) == set()


def test_test_keys_and_the_sandbox_pass_only_when_payments_mode_says_test():
    test_money = {
        **PRODUCTION_ENV,
        "ORDERS_STRIPE__API_KEY": "sk_test_51Hxxxxxxxxxxxxxxxx",
        "ORDERS_PAYPAL__BASE_URL": "https://api-m.sandbox.paypal.com",
    }
    assert refused_keys(test_money) == {"stripe.api_key", "paypal.base_url"}
    assert refused_keys({**test_money, "ORDERS_PAYMENTS__MODE": "test"}) == set()
    # a publishable key is no secret key in any mode
    assert refused_keys({**test_money, "ORDERS_PAYMENTS__MODE": "test", "ORDERS_STRIPE__API_KEY": "pk_test_1"}) == {
        "stripe.api_key"
    }


def test_payments_mode_is_live_unless_set_and_takes_nothing_else():
    assert load_settings(CONFIG, environ={}).payments.mode == "live"
    with pytest.raises(SettingsError, match="payments.mode"):
        load_settings(CONFIG, environ={"ORDERS_PAYMENTS__MODE": "sandbox"})


def test_doctor_says_loudly_that_the_service_takes_test_money():
    from worker.doctor import check_production

    env = {
        **PRODUCTION_ENV,
        "ORDERS_STRIPE__API_KEY": "sk_test_51Hxxxxxxxxxxxxxxxx",
        "ORDERS_PAYPAL__BASE_URL": "https://api-m.sandbox.paypal.com",
        "ORDERS_PAYMENTS__MODE": "test",
    }
    findings = check_production(load_settings(CONFIG, environ=env))
    assert [f.check for f in findings if not f.ok] == []
    (money,) = [f for f in findings if f.check == "payments.mode"]
    assert money.warning and "TEST MONEY" in money.detail and "NO REAL PAYMENT" in money.detail
    assert "Stripe" in money.detail and "PayPal" in money.detail
    assert [f.check for f in check_production(load_settings(CONFIG, environ=PRODUCTION_ENV))] == ["production"]


def _public_key_pem(key: object) -> str:
    return (
        key.public_key()
        .public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode()
    )


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), True),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), False),
        (lambda: ec.generate_private_key(ec.SECP256K1()), True),  # not a curve of ES256/384/512
        (lambda: ec.generate_private_key(ec.SECP192R1()), True),
        (lambda: ec.generate_private_key(ec.SECP256R1()), False),
        (lambda: ec.generate_private_key(ec.SECP521R1()), False),
        (lambda: ed25519.Ed25519PrivateKey.generate(), False),
    ],
    ids=["rsa-1024", "rsa-2048", "ec-secp256k1", "ec-p192", "ec-p256", "ec-p521", "ed25519"],
)
def test_a_weak_jwt_public_key_is_refused(make, refused):
    env = {**PRODUCTION_ENV, "ORDERS_SHIM__JWT_PUBLIC_KEY": _public_key_pem(make())}
    assert refused_keys(env) == ({"shim.jwt_public_key"} if refused else set())


def test_an_empty_string_in_the_environment_is_an_empty_string_not_json():
    settings = load_settings(CONFIG, environ={"ORDERS_SHIM__JWT_SECRET": "", "ORDERS_ENVIRONMENT": "development"})
    assert settings.shim.jwt_secret.get_secret_value() == ""


def test_the_development_defaults_are_long_enough_for_hs256():
    shim = load_settings(CONFIG, environ={"ORDERS_ENVIRONMENT": "development"}).shim
    assert len(shim.jwt_secret.get_secret_value().encode()) >= production.MIN_HMAC_KEY_BYTES
    assert len(shim.id_secret.get_secret_value().encode()) >= production.MIN_HMAC_KEY_BYTES


def _rsa_pem() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem.decode()


def test_with_a_public_key_configured_a_token_signed_with_the_shipped_hmac_secret_is_refused():
    key, pem = _rsa_pem()
    cfg = load_settings(CONFIG, environ={"ORDERS_SHIM__JWT_PUBLIC_KEY": pem}).shim
    auth = Authenticator(cfg)
    claims = {"sub": "mallory", "roles": ["admin"], "exp": int(time.time()) + 60}
    forged = jwt.encode(claims, cfg.jwt_secret.get_secret_value(), algorithm="HS256")
    with pytest.raises(ApiError) as refused:
        auth.principal("Bearer " + forged)
    assert refused.value.status == 401
    # the key's own family still works
    assert auth.principal("Bearer " + jwt.encode(claims, key, algorithm="RS256")).user_id == "mallory"
    assert auth.principal("Bearer " + jwt.encode(claims, key, algorithm="PS256")).is_admin


def test_a_subject_with_a_trailing_newline_is_refused():
    cfg = load_settings(CONFIG, environ={"ORDERS_ENVIRONMENT": "development"}).shim
    auth = Authenticator(cfg)
    token = jwt.encode(
        {"sub": "bob\n", "exp": int(time.time()) + 60}, cfg.jwt_secret.get_secret_value(), algorithm="HS256"
    )
    with pytest.raises(ApiError) as refused:
        auth.principal("Bearer " + token)
    assert refused.value.status == 401


def _clean_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    env["ORDERS_CONFIG"] = str(CONFIG)
    return env


@pytest.mark.parametrize("command", [["worker"], ["relay"], ["shim", "--port", "0"]])
def test_the_long_running_commands_refuse_to_start_in_production_naming_key_and_variable(command):
    done = subprocess.run([ORDERS, *command], env=_clean_environ(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "shim.jwt_secret (ORDERS_SHIM__JWT_SECRET)" in done.stderr
    assert "stripe.api_base (ORDERS_STRIPE__API_BASE)" in done.stderr


def test_doctor_reports_each_production_problem():
    env = {
        **_clean_environ(),
        "ORDERS_DATABASE__PORT": "1",
        "ORDERS_REDIS__PORT": "1",
        "ORDERS_RABBITMQ__URL": "amqp://guest:guest@127.0.0.1:1/",
    }
    done = subprocess.run([ORDERS, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120)
    import json

    findings = json.loads(done.stdout)["findings"]
    production_lines = [f["detail"] for f in findings if f["check"] == "production" and not f["ok"]]
    assert any(line.startswith("shim.jwt_secret (ORDERS_SHIM__JWT_SECRET)") for line in production_lines)
    assert any(line.startswith("paypal.base_url (ORDERS_PAYPAL__BASE_URL)") for line in production_lines)
    assert done.returncode == 1
