"""Small validation helpers shared by the runtime, the server, the drafters, the device profiles and the exporter
(a leaf: the standard library only)."""

from __future__ import annotations

import math


def short_repr(value, limit: int = 80) -> str:
    """repr of a value for an error message, cut to `limit` characters (a corrupt field may be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def is_int(value) -> bool:
    """An int that is not a bool (JSON validation)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite int or float that is not a bool (JSON validation; an int too large for a float is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
