"""round-robin: the conformance suite, rotation properties (hypothesis), and real upstreams."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshcore
from meshcore.testing.conformance.balancer import BalancerConformance, endpoints

pytestmark = pytest.mark.anyio

PLUGINS = ("round-robin",)
KIND = "round-robin"


class TestRoundRobinConformance(BalancerConformance):
    plugins = PLUGINS
    kind = KIND


SUITE = BalancerConformance()
SUITE.plugins, SUITE.kind = PLUGINS, KIND
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def spread(counts: Counter, eps) -> int:
    values = [counts.get(ep, 0) for ep in eps]
    return max(values) - min(values)


async def test_rotation_is_exact_over_any_prefix_and_across_snapshot_changes(mesh_factory):
    """Max - min count ≤ 1 after any number of picks, also right after a snapshot change."""
    async with SUITE.running(mesh_factory, endpoints(2)) as upstream:

        @PROPERTY
        @given(
            sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
            picks=st.lists(st.integers(0, 200), min_size=4, max_size=4),
            firsts=st.lists(st.integers(1, 50), min_size=4, max_size=4),
        )
        def check(sizes, picks, firsts):
            for size, count, first in zip(sizes, picks, firsts):
                eps = endpoints(size, first=first)
                upstream.publish(eps)
                counts: Counter = Counter()
                for i in range(count):
                    counts[SUITE.pick(upstream)] += 1
                    # per cycle: never more than one apart at any moment
                    assert spread(counts, eps) <= 1, (i, counts)
                if count >= size:
                    assert set(counts) == set(eps)
                # a full cycle gives each endpoint exactly one more pick
                before = Counter(counts)
                for _ in range(size):
                    counts[SUITE.pick(upstream)] += 1
                assert all(counts[ep] - before[ep] == 1 for ep in eps)

        check()


async def test_never_an_ejected_endpoint_unless_all_are(mesh_factory):
    async with SUITE.running(mesh_factory, endpoints(2)) as upstream:

        @PROPERTY
        @given(size=st.integers(1, 30), data=st.data())
        def check(size, data):
            eps = endpoints(size)
            upstream.publish(eps)
            for ep in upstream.ejected:
                upstream.restore(ep)
            ejected = data.draw(st.sets(st.sampled_from(eps)), label="ejected")
            for ep in ejected:
                upstream.eject(ep, 60)
            panics = upstream.panics
            picked = [SUITE.pick(upstream) for _ in range(3 * size)]
            healthy = [ep for ep in eps if ep not in ejected]
            if healthy:
                assert set(picked) == set(healthy)
                assert upstream.panics == panics
                # still a rotation among the healthy ones
                assert spread(Counter(picked), healthy) <= 1
            else:
                assert set(picked) == set(eps)
                assert upstream.panics == panics + len(picked)

        check()


async def test_snapshot_change_does_not_burst_onto_the_first_endpoint(mesh_factory):
    """Discovery republishing often must not send every change's first pick to eps[0]."""
    eps = endpoints(10)
    async with SUITE.running(mesh_factory, eps) as upstream:
        firsts: Counter = Counter()
        for i in range(200):
            # alternate two different snapshots that both start with eps[0]
            upstream.publish(eps if i % 2 else eps + endpoints(1, first=50))
            firsts[SUITE.pick(upstream)] += 1
    assert firsts[eps[0]] < 60, firsts


def test_start_offset_differs_between_balancers():
    """Two processes (balancer instances) do not start on the same endpoint in step."""
    eps = tuple(endpoints(1000))
    snapshot = meshcore.Snapshot(eps, 1)

    class Bare:  # the least an upstream offers to a balancer when nothing is ejected
        ejected = ()

        @staticmethod
        def is_ejected(ep):
            return False

    from meshcore_roundrobin import RoundRobin

    starts = {RoundRobin(Bare()).pick(snapshot, None, ()) for _ in range(20)}
    assert len(starts) > 10


async def test_weights_are_ignored(mesh_factory):
    eps = [meshcore.Endpoint("192.0.2.1", 80, weight=5), meshcore.Endpoint("192.0.2.2", 80, weight=0)]
    async with SUITE.running(mesh_factory, eps) as upstream:
        counts = Counter(SUITE.picks_of(upstream, 100))
    assert counts[eps[0]] == counts[eps[1]] == 50


async def test_real_upstreams_share_requests_evenly(upstream, mesh_factory):
    servers = [upstream(f"rr{i}") for i in range(3)]
    names: Counter = Counter()
    async with mesh_factory(SUITE.config(servers), plugins=list(PLUGINS)) as mesh, mesh.client() as client:
        for _ in range(30):
            names[(await client.get("http://svc/")).headers["x-upstream"]] += 1
    assert names == {"rr0": 10, "rr1": 10, "rr2": 10}


async def test_round_robin_takes_no_settings(mesh_factory):
    config = SUITE.config(endpoints(2), **{KIND: {"weights": True}})
    with pytest.raises(meshcore.ConfigError, match=r"services\.svc\.round-robin\.weights"):
        mesh_factory(config, plugins=list(PLUGINS))
