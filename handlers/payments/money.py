"""Minor/major unit conversion for payment providers.

The service keeps every amount as an integer in ISO 4217 minor units (cents;
yen for JPY, which has none).  Stripe takes minor units as they are.  PayPal
takes a decimal string in major units, and for a few currencies PayPal allows
fewer decimals than ISO 4217 says: HUF and TWD have two decimals in ISO but
"do not support decimals" at PayPal (a decimal amount is an error), so such an
amount must be a whole number of forints / dollars.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

#: ISO 4217 currencies with no minor unit.
ZERO_DECIMAL = frozenset(
    {
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "ISK",
        "JPY",
        "KMF",
        "KRW",
        "PYG",
        "RWF",
        "UGX",
        "UYI",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    }
)
#: ISO 4217 currencies with three decimals.
THREE_DECIMAL = frozenset({"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"})
#: Currencies PayPal accepts only as whole major units although ISO gives them decimals.
PAYPAL_NO_DECIMALS = frozenset({"HUF", "TWD"})


class MoneyError(ValueError):
    """An amount cannot be expressed in the requested form."""


def exponent(currency: str) -> int:
    """Number of ISO 4217 decimals of ``currency``."""
    code = currency.upper()
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    return 2


def paypal_decimals(currency: str) -> int:
    """Decimals PayPal accepts for ``currency``."""
    return 0 if currency.upper() in PAYPAL_NO_DECIMALS else exponent(currency)


def to_paypal_value(amount: int, currency: str) -> str:
    """Minor units → PayPal ``value`` string (``1099, "USD"`` → ``"10.99"``).

    Raises :class:`MoneyError` when PayPal cannot take the amount exactly
    (e.g. 12345 HUF minor units = 123.45 Ft, but PayPal takes whole forints).
    """
    if amount < 0:
        raise MoneyError("amount must not be negative")
    major = Decimal(amount).scaleb(-exponent(currency))
    places = paypal_decimals(currency)
    quantum = Decimal(1).scaleb(-places)
    if major != major.quantize(quantum):
        raise MoneyError(f"{currency.upper()} amounts must have at most {places} decimals at PayPal")
    return str(major.quantize(quantum))


def from_decimal_string(value: str, currency: str) -> int:
    """Major-unit decimal string (as providers send it) → minor units."""
    try:
        major = Decimal(value)
    except (InvalidOperation, TypeError):
        raise MoneyError(f"not a decimal amount: {value!r}") from None
    minor = major.scaleb(exponent(currency))
    if minor != minor.to_integral_value() or not major.is_finite():
        raise MoneyError(f"{value!r} has more decimals than {currency.upper()} allows")
    return int(minor)
