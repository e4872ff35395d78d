"""Production mode: the settings a deployment must not run with.

The service runs in ``production`` unless ``environment: development`` (or
``ORDERS_ENVIRONMENT=development``) says otherwise.  In production the
long-running processes (``orders worker``, ``relay``, ``shim``) refuse to
start, exit code 1, one line per problem naming the key and its environment
variable, when:

- a secret is empty or one of the development values this repository ships;
- an HS256 key (``shim.jwt_secret``, ``shim.id_secret``,
  ``shim.webhook_hmac_secret``) is shorter than :data:`MIN_HMAC_KEY_BYTES`,
  or two of them are the same key;
- ``shim.jwt_public_key`` is an RSA key under :data:`MIN_RSA_BITS` bits, an
  EC key on a curve other than P-256/384/521, or no public key at all;
- a payment base URL is not the provider's own (https, provider host);
- Stripe's key is a test-mode or publishable key, or PayPal's API is its
  sandbox, unless ``payments.mode: test`` says the service takes test money;
- the PayPal certificate allow-list names a host other than PayPal's, or a
  port, or the certificates' trust roots are not the system's;
- a webhook timestamp tolerance is over :data:`MAX_WEBHOOK_TOLERANCE_SECONDS`;
- a request head or body may be larger than :data:`MAX_HEADER_BYTES` /
  :data:`MAX_BODY_BYTES`;
- RabbitMQ is reached as ``guest`` (also spelled percent-encoded), or
  ``shim.trusted_proxies`` together trust every IPv4 or every IPv6 address;
- the console is switched on (``console.enabled: true``; it is off in production
  until then) without a session secret of its own, or with a ``console.public_url``
  that is not https (its session cookie is ``Secure``: a browser would not send it back).

``orders doctor`` reports the same problems as findings.  Development mode
(set by ``scripts/up.sh``, the tests and ``compose.yml``) checks nothing
here: the local fakes and the shipped secrets are what it is for.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from handlers.payments.settings import PAYPAL_CERT_HOSTS, cert_origins
from worker.settings import ENV_PREFIX, Settings, ShimSettings

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

#: shortest RSA key accepted for bearer tokens (NIST SP 800-57: 2048 bits until 2030)
MIN_RSA_BITS = 2048
#: EC curves accepted for bearer tokens: those of ES256, ES384 and ES512 (RFC 7518 §3.4)
JWT_EC_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
#: longest webhook timestamp tolerance: the window in which a captured webhook may be replayed
#: (Stripe's own default is 300 s; providers deliver within seconds and retry with fresh signatures)
MAX_WEBHOOK_TOLERANCE_SECONDS = 600
#: largest request head: a bearer token of a few KiB and a proxy's headers fit many times over (nginx's
#: default buffers refuse a header line over 8 KiB); every byte of it is buffered before any check
MAX_HEADER_BYTES = 64 * 1024
#: largest request body: an order of 100 items is about 10 KiB and a provider's webhook some tens of KiB;
#: a body is held whole in memory, so at the default 256 concurrent requests this bounds a process to 256 MiB
MAX_BODY_BYTES = 1024 * 1024
#: Stripe key prefixes of test mode (secret, restricted, publishable)
STRIPE_TEST_KEY_PREFIXES = ("sk_test_", "rk_test_", "pk_test_")
#: PayPal's sandbox API hosts (no real money moves there)
PAYPAL_SANDBOX_HOSTS = frozenset({"api-m.sandbox.paypal.com", "api.sandbox.paypal.com"})

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
    console_secret = settings.console.session_secret.get_secret_value() if settings.console_enabled else ""
    found += _same_keys(shim, console_secret)
    found += _jwt_public_key(shim.jwt_public_key)
    for node in settings.rabbitmq.urls:
        rabbit = urlsplit(node)
        # RabbitMQ percent-decodes the URL's user info: amqp://%67uest:... logs in as guest
        user, password = unquote(rabbit.username or ""), unquote(rabbit.password or "")
        if user in ("", "guest") or password in ("", "guest"):
            found.append(
                Problem("rabbitmq.url", "uses RabbitMQ's guest user or no password; use the service's own user")
            )
            break
    found += _provider_url("stripe.api_base", stripe.api_base, STRIPE_API_HOSTS, "Stripe")
    found += _provider_url("paypal.base_url", paypal.base_url, PAYPAL_API_HOSTS, "PayPal")
    found += _test_money(settings, already={p.key for p in found})
    paypal_origins = {(host, 443) for host in PAYPAL_CERT_HOSTS}
    foreign = sorted(f"{h}:{p}" for h, p in cert_origins(paypal.cert_host_allowlist) - paypal_origins)
    if foreign:
        found.append(
            Problem(
                "paypal.cert_host_allowlist",
                f"names hosts (or ports) that are not PayPal's: {', '.join(foreign)}; "
                "PayPal serves its certificates on port 443",
            )
        )
    if paypal.cert_ca_file:
        found.append(Problem("paypal.cert_ca_file", "must be empty (the system's CAs) in production"))
    for key, tolerance in (
        ("shim.webhook_tolerance_seconds", shim.webhook_tolerance_seconds),
        ("stripe.webhook_tolerance_seconds", stripe.webhook_tolerance_seconds),
    ):
        if tolerance > MAX_WEBHOOK_TOLERANCE_SECONDS:
            found.append(
                Problem(
                    key,
                    f"is {tolerance} s: a captured webhook could be replayed that long; "
                    f"at most {MAX_WEBHOOK_TOLERANCE_SECONDS} s",
                )
            )
    if shim.max_header_bytes > MAX_HEADER_BYTES:
        found.append(
            Problem("shim.max_header_bytes", f"is {shim.max_header_bytes}: at most {MAX_HEADER_BYTES} bytes a head")
        )
    if shim.max_body_bytes > MAX_BODY_BYTES:
        found.append(Problem("shim.max_body_bytes", f"is {shim.max_body_bytes}: at most {MAX_BODY_BYTES} bytes a body"))
    everyone = _trusts_everyone(shim.trusted_proxies)
    if everyone:
        found.append(
            Problem(
                "shim.trusted_proxies",
                f"trusts {' and '.join(everyone)} ({', '.join(str(n) for n in shim.trusted_proxies)}): anyone "
                "could name their own client address; list the proxies",
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


def _same_keys(shim: ShimSettings, console_secret: str = "") -> list[Problem]:
    """Each HMAC key serves one purpose: a key shared by two is leaked by either's use."""
    keys = {
        "shim.jwt_secret": shim.jwt_secret.get_secret_value(),
        "shim.id_secret": shim.id_secret.get_secret_value(),
        "shim.webhook_hmac_secret": shim.webhook_hmac_secret.get_secret_value(),
        "console.session_secret": console_secret,  # only when the console is on
    }
    found, names = [], list(keys)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if keys[name] and keys[name] == keys[other]:
                found.append(Problem(other, f"is the same key as {name}; give each purpose a key of its own"))
    return found


def _jwt_public_key(pem: str) -> list[Problem]:
    if not pem.strip():
        return []
    key = "shim.jwt_public_key"
    try:
        public = serialization.load_pem_public_key(pem.strip().encode())
    except (ValueError, TypeError):
        return [Problem(key, "is not a PEM public key")]
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            return [Problem(key, f"is a {public.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits")]
        return []
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in JWT_EC_CURVES:
            return [Problem(key, f"is an EC key on {public.curve.name}; use P-256, P-384 or P-521")]
        return []
    if isinstance(public, ed25519.Ed25519PublicKey):
        return []
    return [Problem(key, f"is a {type(public).__name__}: use an RSA (2048+ bits), EC (P-256/384/521) or Ed25519 key")]


def _test_money(settings: Settings, already: set[str]) -> list[Problem]:
    """Test keys and the sandbox move no real money: refused unless ``payments.mode: test`` says so."""
    stripe_key = settings.stripe.api_key.get_secret_value()
    found = []
    if "stripe.api_key" not in already:
        if stripe_key.startswith(("pk_live_", "pk_test_")):
            found.append(
                Problem("stripe.api_key", "is a publishable key (pk_...); use a secret (sk_) or restricted (rk_) key")
            )
        elif stripe_key.startswith(STRIPE_TEST_KEY_PREFIXES) and settings.payments.mode != "test":
            found.append(Problem("stripe.api_key", f"is a Stripe test-mode key ({stripe_key[:8]}...): {_TEST_MONEY}"))
    sandbox = (urlsplit(settings.paypal.base_url).hostname or "").lower() in PAYPAL_SANDBOX_HOSTS
    if "paypal.base_url" not in already and sandbox and settings.payments.mode != "test":
        found.append(Problem("paypal.base_url", f"is PayPal's sandbox: {_TEST_MONEY}"))
    return found


_TEST_MONEY = "no real money moves; set payments.mode: test (ORDERS_PAYMENTS__MODE=test) if that is meant"


def takes_test_money(settings: Settings) -> list[str]:
    """Which providers take test money in ``settings`` (for ``orders doctor``)."""
    stripe_key = settings.stripe.api_key.get_secret_value()
    found = []
    if stripe_key.startswith(STRIPE_TEST_KEY_PREFIXES):
        found.append(f"Stripe (a test-mode key, {stripe_key[:8]}...)")
    if (urlsplit(settings.paypal.base_url).hostname or "").lower() in PAYPAL_SANDBOX_HOSTS:
        found.append(f"PayPal (the sandbox, {settings.paypal.base_url})")
    return found


def _trusts_everyone(networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[str]:
    """ "every IPv4 address" / "every IPv6 address" when the networks together cover all of it.

    An IPv4-mapped IPv6 network (``::ffff:0:0/96``) counts as the IPv4 addresses it maps: a
    dual-stack listener sees IPv4 clients that way.
    """
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for net in networks:
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
            continue
        v6.append(net)
        if net.subnet_of(mapped):
            v4.append(ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96)))
        elif net.supernet_of(mapped):
            v4.append(ipaddress.IPv4Network("0.0.0.0/0"))
    found = []
    if any(n.prefixlen == 0 for n in ipaddress.collapse_addresses(v4)):
        found.append("every IPv4 address")
    if any(n.prefixlen == 0 for n in ipaddress.collapse_addresses(v6)):
        found.append("every IPv6 address")
    return found
