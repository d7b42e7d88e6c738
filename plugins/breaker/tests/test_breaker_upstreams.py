"""The breaker against real loopback upstreams (meshcore.testing), on asyncio and trio,
alone and composed as recommended: timeout -> retry -> breaker."""

from __future__ import annotations

import anyio
import pytest
from breaker_testkit import Events, RoundRobin

import meshcore
from meshcore.testing import static_service, strict_integration
from meshcore.testing.conformance.layer import LayerConformance

pytestmark = pytest.mark.anyio


class TestBreakerConformance(LayerConformance):
    kind = "breaker"
    plugins = ["breaker"]
    bad_settings = {
        "consecutive_failures": -1,
        "failure_statuses": ["6xx"],
        "failure_errors": ["bad-luck"],
        "window": "sliding",
        "failure_rate": 150,
        "half_open_probes": 0,
        "base_ejection_time": "a while",
    }


class TestBreakerAfterRetryConformance(LayerConformance):
    kind = "breaker"
    plugins = ["retry", "breaker"]
    other_layers = ["timeout", "retry"]
    settings = {"minimum_calls": 5, "window_size": 10}


@pytest.fixture
def with_retry() -> None:
    if "retry" not in meshcore.installed_plugins():
        message = "meshcore-servicemesh-retry is not installed (pip install -e plugins/retry)"
        if strict_integration():
            pytest.fail(message)
        pytest.skip(message)


def mesh_for(mesh_factory, servers, resilience, events=None, **tables):
    config = {
        "services": {
            "svc": static_service(servers, balancer="test-rr", resilience=resilience, **tables)
        }
    }
    extra = [("test-rr", RoundRobin())] + ([("events", events)] if events else [])
    plugins = [k for k in ("retry", "breaker") if k in resilience or (k == "retry" and "timeout" in resilience)]
    return mesh_factory(config, plugins=plugins, extra_plugins=extra)


async def test_dead_instance_is_hidden_ejected_and_comes_back(upstream, mesh_factory, with_retry):
    servers = [upstream("a"), upstream("b"), upstream("c")]
    events = Events()
    errors: list[BaseException] = []
    statuses: list[int] = []
    breaker = {"base_ejection_time": "200ms", "max_ejection_time": "400ms"}
    retry = {"backoff_base": "1ms", "backoff_max": "5ms"}
    mesh = mesh_for(mesh_factory, servers, ["timeout", "retry", "breaker"], events,
                    breaker=breaker, retry=retry)
    async with mesh, mesh.client() as client:

        async def get() -> None:
            try:
                response = await client.get("http://svc/")
                statuses.append(response.status_code)
            except Exception as exc:  # noqa: BLE001 - any error reaching the client is counted
                errors.append(exc)

        for _ in range(30):
            await get()
        servers[1].stop()
        for _ in range(60):
            await get()
        up = mesh.upstream("svc")
        dead = next(ep for ep in up.snapshot.endpoints if ep.port == servers[1].port)
        assert ("svc", "ejection", dead.id, "active", "ejected") in events.changes
        assert up.stats[dead].times_ejected >= 1
        seen_before = servers[1].requests
        servers[1].start()
        with anyio.fail_after(10):
            while servers[1].requests == seen_before:
                await get()
        for _ in range(30):
            await get()
        state = mesh.state()["services"]["svc"]
    assert errors == [], f"errors reached the client: {errors[:3]}"
    assert set(statuses) == {200}
    assert state["breaker"]["circuit"]["state"] == "closed"
    assert servers[1].requests > seen_before


async def test_breaker_alone_ejects_a_failing_instance(upstream, mesh_factory):
    servers = [upstream("a"), upstream("b", status=500), upstream("c")]
    async with mesh_for(mesh_factory, servers, ["breaker"]) as mesh, mesh.client() as client:
        statuses = [(await client.get("http://svc/")).status_code for _ in range(60)]
        ejected = [ep.port for ep in mesh.upstream("svc").ejected]
    assert ejected == [servers[1].port]
    assert statuses.count(500) == 5, "five consecutive failures, then no more traffic"


async def test_client_errors_do_not_eject(upstream, mesh_factory):
    servers = [upstream("a", status=404), upstream("b", status=404), upstream("c", status=404)]
    async with mesh_for(mesh_factory, servers, ["breaker"]) as mesh, mesh.client() as client:
        for _ in range(30):
            await client.get("http://svc/")
        assert mesh.upstream("svc").ejected == []


async def test_whole_service_down_opens_the_circuit_and_retry_does_not_hammer_it(
    upstream, mesh_factory, with_retry
):
    servers = [upstream(n, status=503) for n in "abc"]
    breaker = {"minimum_calls": 10, "window_size": 10, "open_duration": "30s",
               "consecutive_failures": 0}
    mesh = mesh_for(mesh_factory, servers, ["timeout", "retry", "breaker"], breaker=breaker,
                    retry={"backoff_base": "1ms", "backoff_max": "2ms"})
    async with mesh, mesh.client() as client:
        with pytest.raises(meshcore.CircuitOpen) as info:
            for _ in range(10):
                await client.get("http://svc/")
        sent = sum(s.requests for s in servers)
        for _ in range(20):
            with pytest.raises(meshcore.CircuitOpen):
                await client.get("http://svc/")
    assert sum(s.requests for s in servers) == sent == 10
    assert info.value.service == "svc" and "probes resume in" in str(info.value)
