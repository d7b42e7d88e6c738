"""Retry against real loopback upstreams (meshcore.testing), on asyncio and trio."""

from __future__ import annotations

import anyio
import pytest
from retry_testkit import RoundRobin

import meshcore
from meshcore.testing import static_service
from meshcore.testing.conformance.layer import LayerConformance

pytestmark = pytest.mark.anyio


class TestRetryConformance(LayerConformance):
    kind = "retry"
    plugins = ["retry"]
    settings = {"attempts": 3}
    bad_settings = {
        "attempts": 0,
        "backoff_base": "soon",
        "statuses": [700],
        "retry_on": ["everything"],
        "methods": ["FETCH"],
        "budget_ratio": -1,
    }


class TestTimeoutConformance(LayerConformance):
    kind = "timeout"
    plugins = ["retry"]
    settings = {"deadline": "5s"}
    bad_settings = {"deadline": "forever"}


class TestStackConformance(LayerConformance):
    kind = "retry"
    plugins = ["retry"]
    other_layers = ["timeout"]


def mesh_for(mesh_factory, servers, **tables):
    resilience = tables.pop("resilience", ["retry"])
    config = {
        "services": {
            "svc": static_service(servers, balancer="test-rr", resilience=resilience, **tables)
        }
    }
    return mesh_factory(config, plugins=["retry"], extra_plugins=[("test-rr", RoundRobin())])


async def test_one_of_three_failing_half_the_time_is_hidden(upstream, mesh_factory):
    servers = [upstream("a"), upstream("b", fail_every=2), upstream("c")]
    ok = 0
    total = 300
    fast = {"backoff_base": "1ms", "backoff_max": "2ms"}
    async with mesh_for(mesh_factory, servers, retry=fast) as mesh, mesh.client() as client:
        for _ in range(total):
            response = await client.get("http://svc/")
            ok += response.status_code == 200
    assert ok / total > 0.99
    assert servers[1].requests > 50, "the flaky upstream kept its share"


async def test_without_retry_the_same_flakiness_shows(upstream, mesh_factory):
    # The control for the test above: it would pass for the wrong reason if this did not fail.
    servers = [upstream("a"), upstream("b", fail_every=2), upstream("c")]
    async with mesh_for(mesh_factory, servers, resilience=[]) as mesh, mesh.client() as client:
        statuses = [(await client.get("http://svc/")).status_code for _ in range(60)]
    assert statuses.count(503) >= 5


async def test_budget_caps_amplification_when_everything_fails_half(upstream, mesh_factory):
    servers = [upstream(f"s{i}", fail_every=2) for i in range(3)]
    requests = 1000
    fast = {"backoff_base": "1ms", "backoff_max": "2ms"}
    async with mesh_for(mesh_factory, servers, retry=fast) as mesh, mesh.client() as client:
        start = anyio.current_time()
        for _ in range(requests):
            await client.get("http://svc/")
        elapsed = anyio.current_time() - start
        budget = mesh.state()["services"]["svc"]["retry"]["budget"]
    attempts = sum(s.requests for s in servers)
    # ratio 0.2 plus 10 retries/s over a 10 s window (at least one window's worth).
    allowance = 10 * max(10.0, elapsed)
    assert attempts <= 1.2 * requests + allowance
    print(f"attempts/requests = {attempts / requests:.3f} in {elapsed:.2f} s")
    assert attempts / requests < 1.35, "without a budget three attempts would give about 1.75"
    assert budget["denied"] > 0 and budget["retries"] == attempts - requests


async def test_post_that_got_503_reaches_the_server_once(upstream, mesh_factory):
    servers = [upstream("a", status=503), upstream("b", status=503), upstream("c", status=503)]
    async with mesh_for(mesh_factory, servers) as mesh, mesh.client() as client:
        response = await client.post("http://svc/", content=b"order #1")
        get = await client.get("http://svc/")
    assert response.status_code == 503 and get.status_code == 503
    posts = [m for s in servers for m, _, _ in s.seen if m == "POST"]
    gets = [m for s in servers for m, _, _ in s.seen if m == "GET"]
    assert len(posts) == 1 and len(gets) == 3


async def test_dead_endpoint_is_retried_around_for_post_too(upstream, mesh_factory):
    from meshcore.testing import free_port

    servers = [upstream("a"), f"127.0.0.1:{free_port()}", upstream("c")]
    async with mesh_for(mesh_factory, servers) as mesh, mesh.client() as client:
        statuses = [
            (await client.post("http://svc/echo", content=b"x" * 10)).status_code
            for _ in range(9)
        ]
    assert statuses == [200] * 9, "a refused connection never reached the server: replayable"


async def test_exhausted_error_names_every_attempt(mesh_factory):
    from meshcore.testing import free_port

    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    async with mesh_for(mesh_factory, dead) as mesh, mesh.client() as client:
        with pytest.raises(meshcore.RetriesExhausted) as info:
            await client.get("http://svc/")
    text = str(info.value)
    for address in dead:
        assert address in text
    assert isinstance(info.value, meshcore.MeshError) and info.value.service == "svc"


async def test_deadline_against_a_hanging_upstream(upstream, mesh_factory):
    servers = [upstream("slow", delay=5.0), upstream("b", delay=5.0), upstream("c", delay=5.0)]
    # Room for a loaded machine: the per-try timeout ends the first attempt with 600 ms of the
    # deadline left, so the retry starts in time even when the loop wakes half a second late;
    # three tries (1.2 s) cannot fit, so the deadline or the give-up rule ends the call.
    mesh = mesh_for(mesh_factory, servers, resilience=["timeout", "retry"],
                    timeout={"deadline": "1s"}, retry={"per_try_timeout": "400ms"})
    async with mesh, mesh.client() as client:
        start = anyio.current_time()
        # Either the deadline cuts a later attempt, or (when the attempts ran long and the
        # backoff's jitter is large) retry stops early because the next try would pass it.
        # A hang guard below the upstreams' 5 s: the deadline, not an upstream, ends the call.
        with anyio.fail_after(4.5), pytest.raises(
            (meshcore.DeadlineExceeded, meshcore.RetriesExhausted)
        ) as info:
            await client.get("http://svc/")
        elapsed = anyio.current_time() - start
        # The per-try timeout ended the first attempt, and the retry went to another upstream
        # before the deadline (each upstream logs a request as it arrives).
        assert "read timeout (0.4 s)" in info.value.attempts[0].cause
        with anyio.fail_after(5):
            while sum(bool(server.seen) for server in servers) < 2:
                await anyio.sleep(0.01)
        for server in servers:
            server.behave(delay=0.0)
        assert (await client.get("http://svc/")).status_code == 200
    if isinstance(info.value, meshcore.DeadlineExceeded):
        assert elapsed >= 1.0
        assert "deadline of 1 s exceeded" in str(info.value)
    else:
        assert "the next retry would pass the deadline" in str(info.value)
