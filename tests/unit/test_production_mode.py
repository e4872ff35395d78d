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
from cryptography.hazmat.primitives.asymmetric import rsa

from worker import production
from worker.settings import load_settings
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
    ],
)
def test_each_unsafe_setting_is_refused_by_name(override, key):
    assert refused_keys({**PRODUCTION_ENV, **override}) == {key}


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
