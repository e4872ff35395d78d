"""``handlers.payments.paypal_client``: the PayPal SDK's configuration, built from the settings alone.

Nothing is sent (the SDK connects on the first call).  Stripe's client keeps
its options private; its timeout, retries and base URL are tested through
the gateway against the fake (``tests/integration/test_payments_*.py``), as
PayPal's are.
"""

from __future__ import annotations

from handlers.payments.paypal_client import paypal_client
from handlers.payments.settings import PayPalSettings


def settings(**overrides: object) -> PayPalSettings:
    values: dict[str, object] = {
        "client_id": "client-id",
        "client_secret": "client-secret",
        "base_url": "http://127.0.0.1:12112/",
        "webhook_id": "WH-ID",
    }
    return PayPalSettings(**{**values, **overrides})


def test_the_paypal_client_has_the_settings_base_url_timeout_and_retries() -> None:
    config = paypal_client(settings(timeout_seconds=3, max_network_retries=4)).config
    assert config.get_base_uri() == "http://127.0.0.1:12112"  # the fake's (or the real API's), never the SDK's own
    assert (config.timeout, config.max_retries, config.backoff_factor) == (3, 4, 0.5)
    assert config.retry_statuses == [429, 500, 502, 503, 504]
    # every mutating call carries PayPal-Request-Id, so POST and PUT are retried as GET is
    assert config.retry_methods == ["GET", "POST", "PUT"]
    credentials = config.client_credentials_auth_credentials
    assert (credentials.o_auth_client_id, credentials.o_auth_client_secret) == ("client-id", "client-secret")


def test_a_token_provider_replaces_the_sdks_own() -> None:
    def fetch(last: object, auth: object) -> object:
        raise AssertionError("not called while building")

    assert paypal_client(settings()).config.client_credentials_auth_credentials.o_auth_token_provider is None
    built = paypal_client(settings(), token_provider=fetch)
    assert built.config.client_credentials_auth_credentials.o_auth_token_provider is fetch
