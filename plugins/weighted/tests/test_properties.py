"""Statistical claims as hypothesis properties, on a real Mesh/Upstream (asyncio and trio).

Tolerances: `weighted` is deterministic, so over S = sum(weights) picks each endpoint gets
*exactly* its weight. `random` and `least-request` (with nothing in flight it is a weighted
draw of two, the first winning ties) are binomial: each count stays within 5 standard
deviations + 2 of N * share, a bound a correct balancer misses with probability < 1e-6 per
check, while a wrong share (e.g. ignoring weights) misses it by far.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshcore
from meshcore.testing.conformance.balancer import BalancerConformance

pytestmark = pytest.mark.anyio

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
RANDOMISED = ["random", "least-request", "least-request:peak-ewma"]


def suite(kind: str) -> BalancerConformance:
    s = BalancerConformance()
    s.plugins = ["weighted"]
    s.kind, _, mode = kind.partition(":")
    s.settings = {"mode": mode} if mode else {}
    return s


def make_endpoints(weights: list[int], first: int = 1) -> list[meshcore.Endpoint]:
    return [meshcore.Endpoint(f"192.0.2.{first + i}", 80, weight=w) for i, w in enumerate(weights)]


def effective(weights: list[int]) -> list[int]:
    return weights if any(weights) else [1] * len(weights)


weights_lists = st.lists(st.integers(0, 12), min_size=1, max_size=12)


async def test_weighted_gives_each_endpoint_exactly_its_weight_per_cycle(mesh_factory):
    s = suite("weighted")
    async with s.running(mesh_factory, make_endpoints([1, 1])) as upstream:

        @PROPERTY
        @given(changes=st.lists(st.tuples(weights_lists, st.integers(1, 40)), min_size=1, max_size=4))
        def check(changes):
            for weights, first in changes:
                eps = make_endpoints(weights, first)
                upstream.publish(eps)
                share = effective(weights)
                total = sum(share)
                for _cycle in range(2):
                    counts = Counter(s.picks_of(upstream, total))
                    assert {ep: counts.get(ep, 0) for ep in eps} == dict(zip(eps, share))

        check()


async def test_weighted_is_smooth():
    """nginx's example 5:1:1 — the heavy endpoint is spread out, never a run of 5."""
    from meshcore_weighted._tables import Schedule

    sched = Schedule(["a", "b", "c"], [5, 1, 1])
    seq = "".join(sched.next() for _ in range(70))
    assert seq.count("a") == 50
    assert "aaaa" not in seq, seq


@pytest.mark.parametrize("kind", RANDOMISED)
async def test_random_shares_match_weights(kind, mesh_factory):
    s = suite(kind)
    async with s.running(mesh_factory, make_endpoints([1, 1])) as upstream:

        @PROPERTY
        @given(weights=weights_lists, first=st.integers(1, 40))
        def check(weights, first):
            eps = make_endpoints(weights, first)
            upstream.publish(eps)
            share = effective(weights)
            total = sum(share)
            n = 3000
            counts = Counter(s.picks_of(upstream, n))
            for ep, w in zip(eps, share):
                p = w / total
                sigma = math.sqrt(n * p * (1 - p))
                assert abs(counts.get(ep, 0) - n * p) <= 5 * sigma + 2, (ep, w, counts)
                if w == 0:
                    assert counts.get(ep, 0) == 0  # zero weight: never, unless all are zero

        check()


@pytest.mark.parametrize("kind", ["weighted", *RANDOMISED])
async def test_never_an_ejected_endpoint_unless_all_are(kind, mesh_factory):
    s = suite(kind)
    async with s.running(mesh_factory, make_endpoints([1, 1])) as upstream:

        @PROPERTY
        @given(weights=weights_lists, data=st.data())
        def check(weights, data):
            eps = make_endpoints(weights)
            upstream.publish(eps)
            for ep in upstream.ejected:
                upstream.restore(ep)
            ejected = data.draw(st.sets(st.sampled_from(eps)), label="ejected")
            excluded = data.draw(st.sets(st.sampled_from(eps)), label="excluded")
            for ep in ejected:
                upstream.eject(ep, 60)
            panics = upstream.panics
            picked = s.picks_of(upstream, 200, exclude=sorted(excluded, key=eps.index))
            healthy = [ep for ep in eps if ep not in ejected]
            if healthy:
                assert upstream.panics == panics
                assert not set(picked) & set(ejected)
                if set(healthy) - excluded:
                    assert not set(picked) & excluded
            else:
                assert upstream.panics == panics + len(picked)
                if excluded != set(eps):
                    assert not set(picked) & excluded

        check()
