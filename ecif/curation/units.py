"""Readable numbers for scores: the one formatter every page of the app uses.

Influence-type scores are around 1e-4, so fixed decimals print them as ``-0.000``.  :func:`si_format`
writes numbers the way Plotly's axes (and so the app's Plots page) do: plain decimals for
``1e-3 <= |x| < 1e4`` (``0.31``, ``2.5``, ``1234``), SI prefixes outside (``−200µ``, ``12.3k``), three
significant digits, trailing zeros dropped and a true minus sign (U+2212).
"""

from __future__ import annotations

import math

MINUS = "\u2212"
#: SI prefixes by exponent of 1000, from 1e-24 to 1e24 (µ is U+00B5, as in Plotly and d3-format).
PREFIXES = {-8: "y", -7: "z", -6: "a", -5: "f", -4: "p", -3: "n", -2: "µ", -1: "m",
            0: "", 1: "k", 2: "M", 3: "G", 4: "T", 5: "P", 6: "E", 7: "Z", 8: "Y"}
#: Plotly's ``minexponent``: numbers within 10^±3 are written without a prefix.
PLAIN_EXPONENT = 3


def _trim(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def si_format(value: float | None, digits: int = 3, signed: bool = False) -> str:
    """``value`` with ``digits`` significant digits, as Plotly writes axis numbers.

    ``signed`` puts ``+`` before positive numbers (harm bars: red minus, green plus).  Zero is
    ``0``, a missing value (None or NaN) ``—``, infinities ``∞``.

    >>> si_format(-2e-4), si_format(0.0641, signed=True), si_format(0.3125), si_format(12345)
    ('−200µ', '+0.0641', '0.312', '12.3k')
    """
    if value is None:
        return "—"
    value = float(value)
    if math.isnan(value):
        return "—"
    sign = MINUS if value < 0 else ("+" if signed and value > 0 else "")
    magnitude = abs(value)
    if math.isinf(magnitude):
        return f"{sign}∞"
    if magnitude == 0:
        return "0"
    digits = max(1, int(digits))
    # Round first, then read the exponent, so 9.996e-5 becomes 100µ rather than 1000µ.
    rounded = float(f"{magnitude:.{digits - 1}e}")
    exponent = math.floor(math.log10(rounded))
    if -PLAIN_EXPONENT <= exponent <= PLAIN_EXPONENT:
        # Whole digits are never rounded away: 1234 stays 1234 (Plotly's ticks do the same).
        text = _trim(f"{magnitude:.{max(0, digits - 1 - exponent)}f}")
    else:
        group = max(-8, min(8, exponent // 3))
        scaled = rounded / 10.0 ** (3 * group)
        text = _trim(f"{scaled:.{max(0, digits - 1 - (exponent - 3 * group))}f}") + PREFIXES[group]
    return sign + text
