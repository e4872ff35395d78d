"""The gateways' own settings: the ``stripe`` and ``paypal`` sections of the configuration.

They live with the gateways that read them; :mod:`worker.settings` puts them
into the service's settings, so the arrow points from the adapters to the
core and never back.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

#: PayPal's webhook certificate hosts (the default ``paypal.cert_host_allowlist``).
PAYPAL_CERT_HOSTS = ("api.paypal.com", "api.sandbox.paypal.com", "api-m.paypal.com", "api-m.sandbox.paypal.com")


def cert_origins(allowlist: tuple[str, ...]) -> frozenset[tuple[str, int]]:
    """(host, port) pairs a certificate URL may name: ``host`` means port 443, ``host:port`` that port.

    Raises ValueError for an entry that is not a host (``127.0.0.1:8443``, ``[::1]:8443`` and
    ``api.paypal.com`` are).
    """
    found = set()
    for entry in allowlist:
        parts = urlsplit("//" + entry.strip())
        try:
            port = parts.port or 443
        except ValueError:
            raise ValueError(f"{entry!r} is not a host or host:port") from None
        if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username is not None:
            raise ValueError(f"{entry!r} is not a host or host:port")
        found.add((parts.hostname.lower(), port))
    return frozenset(found)


class GatewayConfigError(ValueError):
    """A gateway setting names something that cannot be used (a certificate file that does not load)."""


class _GatewaySection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StripeSettings(_GatewaySection):
    api_key: SecretStr
    webhook_secret: SecretStr
    api_base: str = "https://api.stripe.com"
    timeout_seconds: float = Field(default=10, gt=0)
    max_network_retries: int = Field(default=2, ge=0)
    webhook_tolerance_seconds: int = Field(default=300, gt=0)


class PayPalSettings(_GatewaySection):
    client_id: str
    client_secret: SecretStr
    base_url: str = "https://api-m.sandbox.paypal.com"
    webhook_id: str
    #: hosts a webhook's PAYPAL-CERT-URL may name (fetched over https on port 443 only): PayPal's certificate
    #: hosts.  ``host:port`` allows another port of a host (the local fake's https listener, never PayPal's)
    cert_host_allowlist: tuple[str, ...] = PAYPAL_CERT_HOSTS
    #: PEM bundle of the roots PayPal's signing certificate (and its https host) must chain to; "" = the system's CAs
    cert_ca_file: str = ""
    verification: Literal["offline", "postback"] = "offline"
    timeout_seconds: float = Field(default=10, gt=0)
    max_network_retries: int = Field(default=2, ge=0)

    @field_validator("cert_host_allowlist")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cert_origins(value)  # raises, naming the entry
        return value
