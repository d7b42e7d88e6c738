"""Ejection and circuit timing through a real mesh pipeline with a scripted terminal.

Ejections last tens of seconds and the circuit stays open a minute by default, so these run
under trio's MockClock (virtual time: exact and instant). The rules that need no long wait run
on asyncio too.
"""

from __future__ import annotations

import anyio
import pytest
from breaker_testkit import PORTS, Events, connect_error

import meshcore
from meshcore.testing import virtual_trio

pytestmark = pytest.mark.anyio

EP = {p: f"127.0.0.1:{p}" for p in PORTS}


@pytest.fixture(params=["trio-virtual", "asyncio"])
def anyio_backend(request):
    if request.param == "asyncio":
        return "asyncio"
    import trio.testing

    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


# Tests of long virtual waits run on trio's MockClock only (they are about virtual time).
VIRTUAL_ONLY = pytest.mark.parametrize("anyio_backend", [virtual_trio()])


def get(target: str = "/x") -> meshcore.Request:
    return meshcore.Request("GET", f"http://svc{target}")


NO_CIRCUIT = {"circuit": False}


async def endpoint_of(mesh, port: int) -> meshcore.Endpoint:
    up = mesh.upstream("svc")
    await up.wait_ready(5)
    return next(ep for ep in up.snapshot.endpoints if ep.port == port)


async def send_all(mesh, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append((await mesh.send(get())).status_code)
        except meshcore.MeshError as exc:
            out.append(type(exc).__name__)
    return out


@VIRTUAL_ONLY
async def test_five_consecutive_failures_eject_for_30s_then_60s(scripted_mesh, anyio_backend):
    bad = PORTS[0]
    events = Events()
    mesh, conn = scripted_mesh(
        lambda port, req, n: 503 if port == bad else 200, breaker=NO_CIRCUIT,
        extra=(("events", events),),
    )
    async with mesh:
        up = mesh.upstream("svc")
        bad_ep = await endpoint_of(mesh, bad)
        await send_all(mesh, 14)  # round robin: the bad endpoint gets 5 of the first 15
        assert not up.is_ejected(bad_ep)
        await send_all(mesh, 1)
        assert up.is_ejected(bad_ep)
        ejected_at = anyio.current_time()
        assert ("svc", "ejection", EP[bad], "active", "ejected") in events.changes
        before = sum(1 for _, port, _, _ in conn.log if port == bad)
        assert set(await send_all(mesh, 30)) == {200}
        assert sum(1 for _, port, _, _ in conn.log if port == bad) == before
        await anyio.sleep(29.9)
        assert up.is_ejected(bad_ep)
        await anyio.sleep(0.2)
        assert not up.is_ejected(bad_ep), "30 s base ejection is over"
        assert ("svc", "ejection", EP[bad], "ejected", "active") in events.changes
        # Five more failures: ejected again, now for 2 x 30 s.
        while not up.is_ejected(bad_ep):
            await send_all(mesh, 1)
        second = anyio.current_time()
        assert second - ejected_at < 31
        await anyio.sleep(59.9)
        assert up.is_ejected(bad_ep)
        await anyio.sleep(0.2)
        assert not up.is_ejected(bad_ep)
        state = mesh.state()["services"]["svc"]["breaker"]
        assert state["ejections"] == 2
        assert state["endpoints"][EP[bad]]["ejection_multiplier"] == 2


@VIRTUAL_ONLY
async def test_ejection_is_capped_and_the_multiplier_decays(scripted_mesh, anyio_backend):
    bad = PORTS[0]
    mesh, _conn = scripted_mesh(
        lambda port, req, n: 503 if port == bad else 200,
        breaker={"circuit": False, "base_ejection_time": "100s", "max_ejection_time": "250s"},
    )
    async with mesh:
        up = mesh.upstream("svc")
        bad_ep = await endpoint_of(mesh, bad)
        durations = []
        for _ in range(4):
            while not up.is_ejected(bad_ep):
                await send_all(mesh, 1)
            durations.append(up.stats[bad_ep].ejected_until - anyio.current_time())
            await anyio.sleep(durations[-1] + 0.01)
        assert durations == pytest.approx([100, 200, 250, 250])
        # Ten healthy intervals (10 s each) later the multiplier has decayed back to zero.
        await anyio.sleep(100)
        while not up.is_ejected(bad_ep):
            await send_all(mesh, 1)
        assert up.stats[bad_ep].ejected_until - anyio.current_time() == pytest.approx(100)


async def test_at_most_ten_percent_but_at_least_one_is_ejected(scripted_mesh, anyio_backend):
    mesh, _conn = scripted_mesh(lambda port, req, n: 503, breaker=NO_CIRCUIT)
    async with mesh:
        await send_all(mesh, 60)
        up = mesh.upstream("svc")
        assert len(up.ejected) == 1
        assert mesh.state()["services"]["svc"]["breaker"]["ejections_refused_max_percent"] > 0


async def test_4xx_are_not_failures_but_errors_are(scripted_mesh, anyio_backend):
    def script(port, req, n):
        if port == PORTS[1]:
            raise connect_error(port)
        return 404

    mesh, _conn = scripted_mesh(script, breaker=NO_CIRCUIT)
    async with mesh:
        await send_all(mesh, 30)
        up = mesh.upstream("svc")
        assert [ep.port for ep in up.ejected] == [PORTS[1]]


async def test_failure_statuses_setting(scripted_mesh, anyio_backend):
    mesh, _conn = scripted_mesh(
        lambda port, req, n: 429 if port == PORTS[2] else 503,
        breaker={"circuit": False, "failure_statuses": ["429"], "max_ejection_percent": 100},
    )
    async with mesh:
        await send_all(mesh, 30)
        assert [ep.port for ep in mesh.upstream("svc").ejected] == [PORTS[2]]


CIRCUIT = {
    "consecutive_failures": 0,
    "window_size": 4,
    "minimum_calls": 4,
    "failure_rate": 50,
    "open_duration": "10s",
    "half_open_probes": 2,
}


@VIRTUAL_ONLY
async def test_circuit_opens_fails_fast_then_probes_and_closes(scripted_mesh, anyio_backend):
    healthy = False
    events = Events()
    mesh, conn = scripted_mesh(
        lambda port, req, n: 200 if healthy else 503, breaker=CIRCUIT, extra=(("ev", events),)
    )
    async with mesh:
        assert await send_all(mesh, 4) == [503] * 4
        start = anyio.current_time()
        with pytest.raises(meshcore.CircuitOpen) as info:
            await mesh.send(get())
        assert info.value.service == "svc"
        assert info.value.retry_at == pytest.approx(start + 10)
        assert "probes resume in 10.0 s" in str(info.value)
        assert len(conn.log) == 4, "an open circuit sends nothing"
        assert ("svc", "breaker", "svc", "closed", "open") in events.changes
        assert mesh.state()["services"]["svc"]["breaker"]["circuit"]["state"] == "open"
        await anyio.sleep(10)
        healthy = True
        assert await send_all(mesh, 2) == [200, 200]
        assert ("svc", "breaker", "svc", "open", "half-open") in events.changes
        assert ("svc", "breaker", "svc", "half-open", "closed") in events.changes
        assert await send_all(mesh, 5) == [200] * 5


@VIRTUAL_ONLY
async def test_failed_probes_open_the_circuit_again(scripted_mesh, anyio_backend):
    mesh, _conn = scripted_mesh(lambda port, req, n: 503, breaker=CIRCUIT)
    async with mesh:
        await send_all(mesh, 4)
        await anyio.sleep(10)
        assert await send_all(mesh, 3) == [503, 503, "CircuitOpen"]
        circuit = mesh.state()["services"]["svc"]["breaker"]["circuit"]
        assert circuit["state"] == "open" and circuit["opened"] == 2


@VIRTUAL_ONLY
async def test_half_open_admits_only_the_probes_under_concurrency(scripted_mesh, anyio_backend):
    mesh, conn = scripted_mesh(lambda port, req, n: 503 if len(conn.log) <= 4 else 1.0, breaker=CIRCUIT)
    results: list = []
    async with mesh:
        await send_all(mesh, 4)
        await anyio.sleep(10)
        sent = len(conn.log)

        async def one() -> None:
            results.extend(await send_all(mesh, 1))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
        assert len(conn.log) - sent == 2
        assert sorted(map(str, results)) == ["200", "200"] + ["CircuitOpen"] * 8


@VIRTUAL_ONLY
async def test_cancelled_probe_counts_as_a_failure(scripted_mesh, anyio_backend):
    slow = False
    mesh, _conn = scripted_mesh(lambda port, req, n: 5.0 if slow else 503, breaker=CIRCUIT)
    async with mesh:
        await send_all(mesh, 4)
        await anyio.sleep(10)
        slow = True
        with anyio.move_on_after(1):
            await mesh.send(get())
        slow = False
        await send_all(mesh, 1)
        circuit = mesh.state()["services"]["svc"]["breaker"]["circuit"]
        assert circuit["state"] == "open", "1 of 2 probes failed: 50% reopens"


@VIRTUAL_ONLY
async def test_slow_calls_open_the_circuit(scripted_mesh, anyio_backend):
    mesh, _conn = scripted_mesh(
        lambda port, req, n: 2.0,
        breaker={**CIRCUIT, "slow_call_duration": "1s", "slow_call_rate": 75},
    )
    async with mesh:
        assert await send_all(mesh, 5) == [200] * 4 + ["CircuitOpen"]


@VIRTUAL_ONLY
async def test_time_window_forgets_old_failures(scripted_mesh, anyio_backend):
    failing = True
    mesh, _conn = scripted_mesh(
        lambda port, req, n: 503 if failing else 200,
        breaker={**CIRCUIT, "window": "time", "window_size": 5},
    )
    async with mesh:
        await send_all(mesh, 3)
        await anyio.sleep(6)  # those 3 failures leave the 5 s window
        failing = False
        assert await send_all(mesh, 4) == [200] * 4
        failing = True
        assert await send_all(mesh, 3) == [503] * 3
        assert mesh.state()["services"]["svc"]["breaker"]["circuit"]["state"] == "closed"
        assert await send_all(mesh, 2) == [503, "CircuitOpen"]


async def test_no_endpoints_is_not_a_circuit_failure(mesh_factory, anyio_backend):
    from breaker_testkit import RoundRobin

    config = {"services": {"svc": {"discovery": "static", "static": {"endpoints": []},
                                   "balancer": "test-rr", "resilience": ["breaker"],
                                   "breaker": CIRCUIT}}}
    mesh = mesh_factory(config, plugins=["breaker"], extra_plugins=[("rr", RoundRobin())])
    async with mesh:
        for _ in range(6):
            with pytest.raises(meshcore.NoEndpoints):
                await mesh.send(get())
        assert mesh.state()["services"]["svc"]["breaker"]["circuit"]["state"] == "closed"
