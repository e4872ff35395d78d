"""Sanity checks of the Stripe and PayPal settings (no provider is called).

A configuration "looks like production" when a payment base URL points at a
provider's live API host; then placeholder secrets and loopback entries in
the PayPal certificate allow-list are errors rather than local-test comfort.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from worker.doctor import Finding
from worker.settings import Settings

#: provider hosts that take real money
LIVE_HOSTS = {"api.stripe.com", "api-m.paypal.com", "api.paypal.com"}
#: substrings that mark a value nobody filled in
PLACEHOLDERS = ("fake", "change-me", "changeme", "placeholder", "example", "dummy", "xxx", "todo")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _placeholder(value: str) -> bool:
    lowered = value.strip().lower()
    return not lowered or any(p in lowered for p in PLACEHOLDERS)


def _url_problem(name: str, url: str) -> Finding | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Finding(name, False, f"{url!r} is not an http(s) URL", f"Set {name} to e.g. https://api.example.com.")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK:
        return Finding(
            name,
            False,
            f"{url} is plain http to a remote host",
            f"Use https for {name}; plain http is only for the local fakes.",
        )
    return None


def check_payments(settings: Settings) -> list[Finding]:
    stripe, paypal = settings.stripe, settings.paypal
    found: list[Finding] = []
    for name, url in (("stripe.api_base", stripe.api_base), ("paypal.base_url", paypal.base_url)):
        problem = _url_problem(name, url)
        if problem:
            found.append(problem)
    hosts = {urlsplit(stripe.api_base).hostname, urlsplit(paypal.base_url).hostname}
    live = bool(hosts & LIVE_HOSTS)
    secrets = {
        "stripe.api_key": stripe.api_key.get_secret_value(),
        "stripe.webhook_secret": stripe.webhook_secret.get_secret_value(),
        "paypal.client_id": paypal.client_id,
        "paypal.client_secret": paypal.client_secret.get_secret_value(),
        "paypal.webhook_id": paypal.webhook_id,
        "shim.jwt_secret": settings.shim.jwt_secret.get_secret_value(),
    }
    if live:
        for key, value in secrets.items():
            if _placeholder(value):
                env = "ORDERS_" + key.replace(".", "__").upper()
                found.append(
                    Finding(
                        key,
                        False,
                        "is a placeholder in a configuration that talks to a live provider",
                        f"Set the real value through {env} (from your secret store), not in the file.",
                    )
                )
        if LOOPBACK & set(paypal.cert_host_allowlist):
            found.append(
                Finding(
                    "paypal.cert_host_allowlist",
                    False,
                    "allows loopback hosts in production",
                    "Keep only PayPal's hosts (api.paypal.com, api-m.paypal.com) in the allow-list.",
                )
            )
    key = secrets["stripe.api_key"]
    if not key.startswith(("sk_", "rk_")):
        found.append(
            Finding(
                "stripe.api_key",
                False,
                "does not look like a Stripe secret key (sk_... or rk_...)",
                "Use the secret key from the Stripe dashboard, not the publishable pk_ key.",
            )
        )
    elif live and key.startswith(("sk_test_", "rk_test_")) and urlsplit(paypal.base_url).hostname in LIVE_HOSTS:
        found.append(
            Finding(
                "stripe.api_key",
                True,
                "is a test-mode key while PayPal is live",
                "Use a live key (sk_live_...) if this is production.",
                warning=True,
            )
        )
    if not secrets["stripe.webhook_secret"].startswith("whsec_"):
        found.append(
            Finding(
                "stripe.webhook_secret",
                False,
                "does not look like a Stripe signing secret (whsec_...)",
                "Copy the endpoint's signing secret from the Stripe dashboard.",
            )
        )
    if not paypal.cert_host_allowlist:
        found.append(
            Finding(
                "paypal.cert_host_allowlist",
                False,
                "is empty: no PayPal webhook can be verified",
                "List PayPal's certificate hosts, e.g. [api.paypal.com, api-m.paypal.com].",
            )
        )
    if not [f for f in found if not f.ok or f.warning]:
        mode = "live providers" if live else "test/sandbox providers"
        found.append(Finding("payments", True, f"Stripe and PayPal settings look sane ({mode})"))
    return found
