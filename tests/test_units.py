"""The app's one number formatter (ecif.curation.units.si_format), written like Plotly's axes."""

from __future__ import annotations

import math

import pytest

from ecif.curation.units import si_format


@pytest.mark.parametrize(("value", "text"), [
    (-2e-4, "−200µ"),  # the Review cards' harm numbers, as the Plots page writes them
    (1.234e-4, "123µ"),
    (-5.6e-7, "−560n"),
    (9.996e-5, "100µ"),  # rounding moves it up a step
    (0.0123, "0.0123"),  # plain decimals within 10^±3, as Plotly
    (0.001, "0.001"),
    (0.3125, "0.312"),
    (-1.2345, "−1.23"),
    (2.0, "2"),
    (1234.0, "1234"),
    (12345.0, "12.3k"),
    (2.5e6, "2.5M"),
    (0.0, "0"),
    (1e-30, "0.000001y"),  # beyond the SI range: padded, never a wrong prefix
])
def test_si_format(value: float, text: str) -> None:
    assert si_format(value) == text


def test_si_format_sign_digits_and_missing() -> None:
    assert si_format(0.0641, signed=True) == "+0.0641"
    assert si_format(-0.0641, signed=True) == "−0.0641"
    assert si_format(0.0, signed=True) == "0"
    assert si_format(1.23456e-4, digits=5) == "123.46µ"
    assert si_format(math.nan) == si_format(None) == "—"
    assert si_format(-math.inf) == "−∞"
