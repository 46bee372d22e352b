"""Byte sizes as written in the config ("80GiB", "20G", "512M") and as shown in status. Pure.

K, M, G, T, P are decimal (SI: 1000**n) and Ki, Mi, Gi, Ti, Pi binary (1024**n), as numfmt and
Kubernetes read them; a trailing "B" is optional, unit letters are case-insensitive, and
whitespace around the number and unit is allowed. A bare number is bytes.
"""

import fractions
import re

# ECMA-262 compatible (JSON Schema has no inline flags): case-insensitive by character classes.
SIZE_PATTERN = (r"^\s*([0-9]+(\.[0-9]+)?|\.[0-9]+)\s*"
                r"([kKmMgGtTpP][iI]?)?[bB]?\s*$")

# For schema.json: a size is a non-negative integer (bytes) or a string of the form above.
SIZE_SCHEMA = {"oneOf": [{"type": "integer", "minimum": 0},
                         {"type": "string", "pattern": SIZE_PATTERN}]}

_SIZE_RE = re.compile(SIZE_PATTERN)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text):
    """Bytes in ``text`` (an int, or a string like "1.5GiB"). Fractions of a byte are dropped.
    Raises ValueError naming the accepted forms."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"size {text!r} is not a number of bytes or a number with a unit "
                         f"like 512M, 20G (powers of 1000) or 80GiB (powers of 1024)")
    number, _, unit = match.groups()
    unit = (unit or "").lower()
    base = 1024 if unit.endswith("i") else 1000
    # Fraction, not float: "1.1T" must not come out a byte short.
    return int(fractions.Fraction(number) * base ** _POWERS[unit.rstrip("i")])


def format_size(n):
    """``n`` bytes for people: binary units, at most one decimal ("20 GiB", "74.5 GiB")."""
    if n is None:
        return "unknown"
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_BINARY_UNITS) - 1:
        value /= 1024
        unit += 1
    shown = f"{value:.1f}".removesuffix(".0") if unit else str(n)
    return f"{shown} {_BINARY_UNITS[unit]}"
