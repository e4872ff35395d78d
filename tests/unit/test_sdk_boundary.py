"""Only ``handlers/payments/`` imports a payment provider's SDK.

The gateways (``stripe_gateway``, ``paypal_gateway``) and the client factories
(``stripe_client``, ``paypal_client``) are the one place where the SDKs'
policies (timeouts, retries, base URLs) and their errors are turned into the
service's; a module elsewhere that imports an SDK goes around them (as
``worker/reconcile.py`` once did, with its own PayPal retry policy).  Read from
the source with :mod:`ast`: no module is imported, no server is needed, and an
import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: the service's packages, whose every module is read
PACKAGES = ("worker", "handlers", "schema")
#: the one package allowed to import an SDK
ALLOWED = "handlers.payments"
#: the SDKs' top-level packages (and ``apimatic_*``: the PayPal SDK's HTTP core and its adapters)
SDKS = frozenset({"stripe", "paypalserversdk", "apimatic_core"})
SDK_PREFIXES = ("apimatic_",)
#: the SDKs' clients and what configures them, and the modules that alone build them
CLIENTS = frozenset({"StripeClient", "HTTPClient", "RequestsClient", "PaypalServersdkClient", "_BaseUrlConfiguration"})
FACTORIES = frozenset({"handlers.payments.stripe_client", "handlers.payments.paypal_client"})


def is_sdk(name: str) -> bool:
    """Whether the dotted module name ``name`` is (part of) a provider SDK."""
    top = name.split(".", 1)[0]
    return top in SDKS or top.startswith(SDK_PREFIXES)


def sdk_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, module) of every SDK import in ``source``: ``import``, ``from ... import``, and
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]  # a relative import stays inside its own package
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [(node.lineno, name) for name in names if is_sdk(name)]
    return sorted(found)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_module_outside_handlers_payments_imports_a_provider_sdk() -> None:
    read = modules()
    assert len(read) > 50, f"only {len(read)} modules found under {PACKAGES}: is ROOT right?"
    breaking = [
        f"{name} imports {sdk} (line {line})"
        for name, path in read
        if name != ALLOWED and not name.startswith(ALLOWED + ".")
        for line, sdk in sdk_imports(path.read_text(), str(path))
    ]
    assert not breaking, "a provider SDK imported outside handlers/payments/:\n" + "\n".join(breaking)


def constructed_clients(source: str) -> list[tuple[int, str]]:
    """(line, class) of every SDK client ``source`` builds (a call to one of :data:`CLIENTS`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if called in CLIENTS:
                found.append((node.lineno, called))
    return found


def test_only_the_client_factories_build_an_sdk_client() -> None:
    """One retry, timeout and base-URL policy per provider: no module but its factory builds its client."""
    built = {
        name: found
        for name, path in modules()
        if (found := constructed_clients(path.read_text())) and name not in FACTORIES
    }
    assert not built, f"SDK clients built outside {sorted(FACTORIES)}: {built}"
    for name in FACTORIES:
        assert constructed_clients((ROOT / (name.replace(".", "/") + ".py")).read_text()), name


def test_the_gateways_and_their_client_factories_are_where_the_sdks_are_imported() -> None:
    """The rule is not vacuous: the walk does see the imports the payments package makes."""
    seen = {name for name, path in modules() if sdk_imports(path.read_text(), str(path))}
    assert {
        "handlers.payments.stripe_client",
        "handlers.payments.paypal_client",
        "handlers.payments.stripe_gateway",
        "handlers.payments.paypal_gateway",
    } <= seen


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import stripe", [(1, "stripe")]),
        ("import json, stripe.params as p", [(1, "stripe.params")]),
        ("from paypalserversdk.api_helper import APIHelper", [(1, "paypalserversdk.api_helper")]),
        ("def f():\n    from apimatic_core.exceptions import x", [(2, "apimatic_core.exceptions")]),
        ("from apimatic_requests_client_adapter import client", [(1, "apimatic_requests_client_adapter")]),
        ("import importlib\nimportlib.import_module('stripe')", [(2, "stripe")]),
        ("m = __import__('paypalserversdk.models')", [(1, "paypalserversdk.models")]),
        ("from handlers.payments import stripe_gateway", []),
        ("import stripes\nfrom . import stripe\nfrom .stripe import x", []),
        ("importlib.import_module(name)", []),
    ],
)
def test_what_counts_as_an_sdk_import(source: str, found: list[tuple[int, str]]) -> None:
    assert sdk_imports(source) == found
