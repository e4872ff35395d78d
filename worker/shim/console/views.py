"""What the console's pages show, made safe and drawable: redaction, bodies, charts, times.

Redaction: no secret and no full payment token or card number reaches a
page.  Values under secret-looking keys (``client_secret``,
``payment_method``, ``authorization``, ...) keep a short prefix and lose the
rest; card-number-like digit runs (13 to 19 digits that pass the Luhn check)
anywhere keep their last four.  Escaping is the templates' (Jinja2 with
autoescape): nothing here marks text as safe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: keys whose values are secrets or payment tokens (compared lower-case, ``-`` as ``_``)
SECRET_KEYS = frozenset(
    {
        "client_secret",
        "payment_method",
        "payment_method_id",
        "card",
        "card_number",
        "number",
        "cvc",
        "cvv",
        "token",
        "access_token",
        "refresh_token",
        "secret",
        "password",
        "api_key",
        "authorization",
        "webhook_secret",
        "iban",
    }
)
#: 13 to 19 digits, optionally in groups separated by a space or a dash
_CARDLIKE = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
MASK = "…(redacted)"


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def mask_cards(text: str) -> str:
    """Card-number-like digit runs with their last four digits only."""

    def one(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        return f"••••{digits[-4:]}" if _luhn(digits) else m.group(0)

    return _CARDLIKE.sub(one, text)


def mask(value: Any) -> str:
    """A secret shown as its first few characters (enough to tell two apart, never to use one)."""
    text = str(value)
    keep = min(6, len(text) // 3)
    return text[:keep] + MASK


def redact(value: Any, key: str = "") -> Any:
    """``value`` with secrets masked (see the module's docstring), for display only."""
    if key and key.lower().replace("-", "_") in SECRET_KEYS and value not in (None, ""):
        return redact_secret(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return mask_cards(value)
    return value


def redact_secret(value: Any) -> Any:
    if isinstance(value, dict):  # e.g. a card object: every field is card data
        return {k: MASK for k in value}
    return mask(value)


@dataclass(frozen=True)
class Body:
    """A message body as a page shows it: pretty JSON (redacted), else text, else bytes in hex."""

    kind: str  # "json", "text" or "bytes"
    text: str
    size: int


def body_of(raw: bytes, limit: int = 64 * 1024) -> Body:
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if parsed is not None or raw.strip() == b"null":
        return Body("json", json.dumps(redact(parsed), indent=2, ensure_ascii=False)[:limit], len(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw[: limit // 3]
        return Body("bytes", " ".join(f"{b:02x}" for b in shown) + (" …" if len(raw) > len(shown) else ""), len(raw))
    return Body("text", mask_cards(text)[:limit], len(raw))


@dataclass(frozen=True)
class Bar:
    x: int
    y: int
    height: int
    value: int
    label: str


@dataclass(frozen=True)
class Chart:
    """A small bar chart of one value per minute, drawn as SVG rectangles (no script, no inline style)."""

    width: int
    height: int
    bar_width: int
    bars: list[Bar]
    peak: int
    total: int


def chart(series: list[int], minutes: list[str], height: int = 48, bar_width: int = 5) -> Chart:
    peak = max(series, default=0)
    bars = []
    for i, value in enumerate(series):
        h = 0 if peak == 0 else max(1 if value else 0, round(value / peak * height))
        label = minutes[i][11:16] if i < len(minutes) else ""
        bars.append(Bar(i * bar_width, height - h, h, value, label))
    return Chart(len(series) * bar_width, height, bar_width - 1, bars, peak, sum(series))


def when(value: Any) -> str:
    """A time as ``YYYY-MM-DD HH:MM:SS`` UTC; ``-`` for none."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def ago(value: Any, now: datetime | None = None) -> str:
    """How long ago: ``45s``, ``12m``, ``3h``, ``2d`` (the units of ``--older-than``)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
