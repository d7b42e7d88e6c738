"""The retry budget's arithmetic, including a property test that it is never exceeded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshcore_retry import RetryBudget


def test_reserve_then_ratio():
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, ttl=10.0)
    now = 100.0
    assert sum(budget.withdraw(now) for _ in range(20)) == 10, "reserve: 1/s x 10 s"
    for _ in range(50):
        budget.deposit(now)
    assert sum(budget.withdraw(now) for _ in range(20)) == 10, "then 20% of 50 requests"
    assert budget.denied == 20
    # The window slides: 10 s later everything above has expired.
    assert budget.withdraw(now + 10.0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ValueError):
        RetryBudget(ttl=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 3, allow_nan=False), st.booleans()), min_size=1, max_size=300
    ),
    st.floats(0, 1),
    st.integers(0, 5),
    st.integers(1, 20),
)
def test_retries_in_any_window_stay_within_the_budget(steps, ratio, per_second, ttl):
    """However requests and retries interleave, retries granted in any window of `ttl`
    seconds never exceed ratio x requests in that window plus the reserve."""
    budget = RetryBudget(ratio=ratio, min_per_second=per_second, ttl=ttl)
    now = 0.0
    deposits: list[float] = []
    grants: list[float] = []
    for advance, is_retry in steps:
        now += advance
        if is_retry:
            if budget.withdraw(now):
                grants.append(now)
        else:
            budget.deposit(now)
            deposits.append(now)
    # Windows are whole seconds: check every window ending at each grant.
    for t in grants:
        lo = int(t) - ttl + 1
        granted = sum(1 for g in grants if lo <= int(g) <= int(t))
        requests = sum(1 for d in deposits if lo <= int(d) <= int(t))
        assert granted <= ratio * requests + per_second * ttl + 1e-9
