"""The HTTP edge settings: their defaults are the safe ones, and a malformed proxy stops start-up."""

from __future__ import annotations

import pytest

from worker.settings import SettingsError, load_settings


def test_the_edge_settings_default_to_ignoring_x_forwarded_for_and_to_loopback_metrics():
    settings = load_settings(environ={})
    assert settings.shim.trusted_proxies == ()
    assert settings.metrics.host == "127.0.0.1"
    assert settings.shim.max_header_bytes == 16384 and settings.shim.body_timeout_seconds == 10


def test_a_trusted_proxy_that_is_not_an_address_or_network_stops_start_up_naming_the_key():
    with pytest.raises(SettingsError, match="shim.trusted_proxies.0"):
        load_settings(environ={"ORDERS_SHIM__TRUSTED_PROXIES": '["proxy.internal"]'})
