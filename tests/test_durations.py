"""Duration strings as Go's `time.ParseDuration` (and so Consul and Envoy) read them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshcore

UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@pytest.mark.parametrize(
    "text, seconds",
    [
        (10, 10.0),
        (2.5, 2.5),
        (0, 0.0),
        ("10", 10.0),
        ("0", 0.0),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("24h", 86400.0),
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        ("1h0m0.5s", 3600.5),
        ("2s500ms", 2.5),
        ("1m 30s", 90.0),
        ("100us", 1e-4),
        ("1µs", 1e-6),
        ("300ns", 3e-7),
    ],
)
def test_durations(text, seconds):
    assert meshcore.parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize(
    "bad",
    ["-1s", "-1m30s", -1, -0.5, float("nan"), "", " ", "s", "1x", "1m30", "1s-2s", "abc",
     "1.2.3s", "1H", "1d", True, None, [1], "1e3s"],
)
def test_bad_durations_say_the_expected_form(bad):
    with pytest.raises(ValueError) as info:
        meshcore.parse_duration(bad)
    message = str(info.value)
    assert '"1m30s"' in message and '"250ms"' in message and repr(bad) in message


def test_a_negative_duration_says_so():
    with pytest.raises(ValueError, match="cannot be negative"):
        meshcore.parse_duration("-5s")


def _amount() -> st.SearchStrategy[str]:
    whole = st.integers(min_value=0, max_value=10**6).map(str)
    decimal = st.tuples(
        st.integers(min_value=0, max_value=10**4), st.integers(min_value=0, max_value=999)
    ).map(lambda p: f"{p[0]}.{p[1]:03d}")
    return whole | decimal


@settings(deadline=None)  # parsing is fast; a loaded CI machine is not
@given(st.lists(st.tuples(_amount(), st.sampled_from(sorted(UNITS))), min_size=1, max_size=6))
def test_compound_durations_round_trip(parts):
    text = "".join(amount + unit for amount, unit in parts)
    expected = math.fsum(float(amount) * UNITS[unit] for amount, unit in parts)
    assert meshcore.parse_duration(text) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_numbers_are_seconds(seconds):
    assert meshcore.parse_duration(seconds) == seconds


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=999))
def test_number_strings_are_seconds(whole, frac):
    assert meshcore.parse_duration(str(whole)) == whole
    assert meshcore.parse_duration(f"{whole}.{frac:03d}") == float(f"{whole}.{frac:03d}")
