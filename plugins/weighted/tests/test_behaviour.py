"""least-request against real slow upstreams, slow start in virtual time, bad settings."""

from __future__ import annotations

import random
from collections import Counter

import anyio
import pytest

import meshcore
from meshcore.testing import virtual_trio
from meshcore.testing.conformance.balancer import BalancerConformance, endpoints

pytestmark = pytest.mark.anyio


def suite(kind: str, **settings) -> BalancerConformance:
    s = BalancerConformance()
    s.plugins, s.kind, s.settings = ["weighted"], kind, settings
    return s


@pytest.mark.parametrize("mode", ["in-flight", "peak-ewma"])
async def test_least_request_sends_less_to_a_slow_upstream(mode, upstream, mesh_factory):
    """Three real upstreams, one answering 50 ms late: it gets clearly less than a third."""
    servers = [upstream("fast1"), upstream("fast2"), upstream("slow", delay=0.05)]
    s = suite("least-request", mode=mode)
    total, workers = 240, 8
    names: Counter = Counter()
    async with mesh_factory(s.config(servers), plugins=s.plugins) as mesh:
        async with mesh.client() as client:

            async def worker() -> None:
                for _ in range(total // workers):
                    response = await client.get("http://svc/")
                    names[response.headers["x-upstream"]] += 1

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for _ in range(workers):
                        tg.start_soon(worker)
        state = mesh.state()["services"]["svc"]
    assert sum(names.values()) == total
    # a fair share would be 80; round-robin would give exactly that
    assert names["slow"] < total * 0.15, names
    assert names["fast1"] > total * 0.3 and names["fast2"] > total * 0.3, names
    if mode == "peak-ewma":
        costs = state["peak_ewma_seconds"]
        slow_id = next(ep.id for ep in mesh.upstream("svc").snapshot if ep.port == servers[2].port)
        assert costs[slow_id] > max(v for k, v in costs.items() if k != slow_id)


async def test_peak_ewma_learns_from_outcomes_and_decays(mesh_factory):
    """observe(): a peak replaces the estimate, then it decays back within the window."""
    eps = endpoints(2)
    s = suite("least-request", mode="peak-ewma", decay="10s")
    async with s.running(mesh_factory, eps) as upstream:
        balancer = upstream.balancer
        for _ in range(5):
            upstream.record(meshcore.Outcome("svc", eps[0], "GET", 200, None, 0.5))
            upstream.record(meshcore.Outcome("svc", eps[1], "GET", 200, None, 0.001))
        assert balancer.costs()[eps[0].id] == pytest.approx(0.5)
        assert set(s.picks_of(upstream, 50)) == {eps[1]}  # 500x the cost: never chosen
        # A fast failure must not make an endpoint look fast. Picks decay the estimate with
        # the (real) time they took, so compare with the estimate just before the failures,
        # not with 0.5: a loaded machine's slow picks made that flaky.
        before = balancer.costs()
        error = meshcore.EndpointConnectError("refused", endpoint=eps[0], service="svc")
        upstream.record(meshcore.Outcome("svc", eps[0], "GET", None, error, 0.0001))
        upstream.record(meshcore.Outcome("svc", eps[0], "GET", 503, None, 0.0001))
        after = balancer.costs()
        assert after[eps[0].id] == pytest.approx(before[eps[0].id], rel=1e-9)
        assert after[eps[0].id] > 100 * after[eps[1].id]


@pytest.mark.parametrize("anyio_backend", [virtual_trio()])
async def test_peak_ewma_cost_decays_when_idle(mesh_factory):
    eps = endpoints(2)
    s = suite("least-request", mode="peak-ewma", decay="10s")
    async with s.running(mesh_factory, eps) as upstream:
        upstream.record(meshcore.Outcome("svc", eps[0], "GET", 200, None, 1.0))
        upstream.record(meshcore.Outcome("svc", eps[1], "GET", 200, None, 0.1))
        assert set(s.picks_of(upstream, 30)) == {eps[1]}
        await anyio.sleep(30)  # three decay windows: e^-3 of the 1 s peak is 0.05 s
        # meanwhile the fast endpoint kept answering in 0.1 s
        upstream.record(meshcore.Outcome("svc", eps[1], "GET", 200, None, 0.1))
        s.picks_of(upstream, 30)
        assert upstream.balancer.costs()[eps[0].id] < 0.06
        assert eps[0] in s.picks_of(upstream, 100)  # the once-slow endpoint is tried again


@pytest.mark.parametrize("anyio_backend", [virtual_trio()])
@pytest.mark.parametrize("kind", ["weighted", "random", "least-request"])
async def test_slow_start_ramps_a_new_endpoint(kind, mesh_factory):
    """Envoy's slow start: 10 % of its weight at first, linear to 100 % over the window."""
    # The shares are draws checked against 4-sigma bounds: one run in several thousand falls
    # outside (seen once in a loaded run, 0.3635 against 1/3 ± 0.03), so the draws are seeded.
    random.seed(94)
    old = endpoints(2)
    new = endpoints(1, first=3)[0]
    s = suite(kind, **{"slow-start-window": "60s"})
    n = 4000

    def share() -> float:
        return Counter(s.picks_of(upstream, n))[new] / n

    async with s.running(mesh_factory, old) as upstream:
        assert share() == 0
        upstream.publish([*old, new])
        assert share() == pytest.approx(0.1 / 2.1, abs=0.02)
        await anyio.sleep(30)
        assert share() == pytest.approx(0.5 / 2.5, abs=0.03)
        await anyio.sleep(31)
        assert share() == pytest.approx(1 / 3, abs=0.03)


async def test_slow_start_is_off_by_default_and_the_first_snapshot_never_ramps(mesh_factory):
    eps = endpoints(3)
    for settings in ({}, {"slow-start-window": "60s"}):
        s = suite("weighted", **settings)
        async with s.running(mesh_factory, eps[:2]) as upstream:
            assert Counter(s.picks_of(upstream, 100)) == {eps[0]: 50, eps[1]: 50}
            if not settings:
                upstream.publish(eps)
                assert Counter(s.picks_of(upstream, 99)) == {ep: 33 for ep in eps}


@pytest.mark.parametrize(
    ("kind", "key", "value", "expected"),
    [
        ("least-request", "mode", "fastest", "one of 'in-flight', 'peak-ewma'"),
        ("least-request", "decay", 0, "≥ 0.001"),
        ("least-request", "decay", "ten seconds", "duration"),
        ("weighted", "slow-start-window", -1, "≥ 0"),
        ("random", "slow-start-min-weight", 2, "between 0.01 and 1"),
        ("weighted", "slow-start-aggression", "fast", "a number"),
        ("random", "mode", "peak-ewma", "unknown setting 'mode'"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(kind, key, value, expected, mesh_factory):
    s = suite(kind, **{key: value})
    with pytest.raises(meshcore.ConfigError) as info:
        mesh_factory(s.config(endpoints(2)), plugins=s.plugins)
    message = str(info.value)
    assert f"services.svc.{kind}.{key}" in message
    assert expected in message


def test_settings_from_defaults_apply_to_every_service(mesh_factory):
    config = {
        "defaults": {"balancer": "least-request", "least-request": {"mode": "nope"}},
        "services": {"a": {"discovery": "static", "static": {"endpoints": ["127.0.0.1:1"]}}},
    }
    with pytest.raises(meshcore.ConfigError, match=r"least-request\.mode"):
        mesh_factory(config, plugins=["weighted"])
