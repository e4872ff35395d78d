"""Production mode: the settings a deployment must not run with.

The service runs in ``production`` unless ``environment: development`` (or
``ORDERS_ENVIRONMENT=development``) says otherwise.  In production the
long-running processes (``orders worker``, ``relay``, ``shim``) refuse to
start, exit code 1, one line per problem naming the key and its environment
variable, when:

- a secret is empty or one of the development values this repository ships;
- an HS256 key (``shim.jwt_secret``, ``shim.id_secret``,
  ``shim.webhook_hmac_secret``) is shorter than :data:`MIN_HMAC_KEY_BYTES`;
- a payment base URL is not the provider's own (https, provider host);
- the PayPal certificate allow-list names a host other than PayPal's, or the
  certificates' trust roots are not the system's;
- RabbitMQ is reached as ``guest``, or ``shim.trusted_proxies`` trusts every address;
- the console is switched on (``console.enabled: true``; it is off in production
  until then) without a session secret of its own, or with a ``console.public_url``
  that is not https (its session cookie is ``Secure``: a browser would not send it back).

``orders doctor`` reports the same problems as findings.  Development mode
(set by ``scripts/up.sh``, the tests and ``compose.yml``) checks nothing
here: the local fakes and the shipped secrets are what it is for.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from handlers.payments.settings import PAYPAL_CERT_HOSTS
from worker.settings import ENV_PREFIX, Settings

#: shortest HMAC key accepted in production (RFC 7518 §3.2: at least the hash's size)
MIN_HMAC_KEY_BYTES = 32

#: secrets this repository ships for local use (config/config.yaml, compose.yml, earlier releases)
DEVELOPMENT_SECRETS = frozenset(
    {
        "change-me-in-production",
        "development-only-jwt-secret-do-not-use-in-production",
        "development-only-id-secret-do-not-use-in-production",
        "development-only-console-secret-do-not-use-in-production",
        "sk_test_local_fake",
        "whsec_local_fake",
        "local-fake-secret",
        "local-fake-client",
        "sk_test_replace_me",
        "whsec_replace_me",
        "replace-me",
    }
)

#: the providers' API hosts (https only)
STRIPE_API_HOSTS = frozenset({"api.stripe.com"})
PAYPAL_API_HOSTS = frozenset(
    {"api-m.paypal.com", "api-m.sandbox.paypal.com", "api.paypal.com", "api.sandbox.paypal.com"}
)


@dataclass(frozen=True)
class Problem:
    """One setting production mode refuses."""

    key: str  # dotted, e.g. shim.jwt_secret
    message: str

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "__").upper()

    def line(self) -> str:
        return f"{self.key} ({self.variable}): {self.message}"


def _secret(key: str, value: str, *, hmac_key: bool = False, optional: bool = False) -> list[Problem]:
    if not value:
        return [] if optional else [Problem(key, "is empty")]
    if value in DEVELOPMENT_SECRETS:
        return [Problem(key, "is a development default; set a secret of your own")]
    if hmac_key and len(value.encode()) < MIN_HMAC_KEY_BYTES:
        return [Problem(key, f"is shorter than {MIN_HMAC_KEY_BYTES} bytes")]
    return []


def _provider_url(key: str, url: str, hosts: frozenset[str], provider: str) -> list[Problem]:
    parts = urlsplit(url)
    if parts.scheme != "https" or (parts.hostname or "").lower() not in hosts or parts.username or parts.port:
        return [Problem(key, f"{url!r} is not {provider}'s API (https://{sorted(hosts)[0]})")]
    return []


def problems(settings: Settings) -> list[Problem]:
    """What production mode refuses in ``settings`` (empty in development)."""
    if settings.environment != "production":
        return []
    shim, stripe, paypal = settings.shim, settings.stripe, settings.paypal
    found: list[Problem] = []
    public_key = bool(shim.jwt_public_key.strip())
    # with a public key configured only that family is accepted, so an HS256 key is not needed
    found += _secret("shim.jwt_secret", shim.jwt_secret.get_secret_value(), hmac_key=True, optional=public_key)
    found += _secret("shim.id_secret", shim.id_secret.get_secret_value(), hmac_key=True)
    found += _secret(
        "shim.webhook_hmac_secret", shim.webhook_hmac_secret.get_secret_value(), hmac_key=True, optional=True
    )
    found += _secret("stripe.api_key", stripe.api_key.get_secret_value())
    found += _secret("stripe.webhook_secret", stripe.webhook_secret.get_secret_value())
    found += _secret("paypal.client_id", paypal.client_id)
    found += _secret("paypal.client_secret", paypal.client_secret.get_secret_value())
    found += _secret("paypal.webhook_id", paypal.webhook_id)
    for node in settings.rabbitmq.urls:
        rabbit = urlsplit(node)
        if rabbit.username in (None, "", "guest") or rabbit.password in (None, "", "guest"):
            found.append(
                Problem("rabbitmq.url", "uses RabbitMQ's guest user or no password; use the service's own user")
            )
            break
    found += _provider_url("stripe.api_base", stripe.api_base, STRIPE_API_HOSTS, "Stripe")
    found += _provider_url("paypal.base_url", paypal.base_url, PAYPAL_API_HOSTS, "PayPal")
    foreign = sorted({h.lower() for h in paypal.cert_host_allowlist} - set(PAYPAL_CERT_HOSTS))
    if foreign:
        found.append(Problem("paypal.cert_host_allowlist", f"names hosts that are not PayPal's: {', '.join(foreign)}"))
    if paypal.cert_ca_file:
        found.append(Problem("paypal.cert_ca_file", "must be empty (the system's CAs) in production"))
    open_proxies = [str(n) for n in shim.trusted_proxies if n.prefixlen == 0]
    if open_proxies:
        found.append(
            Problem(
                "shim.trusted_proxies",
                f"trusts every address ({', '.join(open_proxies)}): anyone could "
                "name their own client address; list the proxies",
            )
        )
    if settings.console_enabled:
        found += _secret("console.session_secret", settings.console.session_secret.get_secret_value(), hmac_key=True)
        public = settings.console.public_url
        if public and urlsplit(public).scheme != "https":
            found.append(
                Problem("console.public_url", f"{public!r} is not https (the console's session cookie is Secure)")
            )
    return found
