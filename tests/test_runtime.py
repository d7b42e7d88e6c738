"""The runtime: discovery watchers, stale-on-error, bounded first wait, layers, events, shutdown."""

from __future__ import annotations

import anyio
import pytest

import meshcore
from meshcore import Endpoint
from meshcore.testing import static_service, virtual_trio

pytestmark = pytest.mark.anyio


class Scripted:
    """An inline discovery plugin the test drives: each item sent is published or raised."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream(10)
        self.watch_calls = 0

    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("scripted", "discovery")]

    @meshcore.hookimpl
    def meshcore_discovery(self, kind, settings, service):
        if kind != "scripted":
            return None
        plugin = self

        class Watch:
            async def watch(self, sink):
                plugin.watch_calls += 1
                async for item in plugin.receive:
                    if isinstance(item, Exception):
                        raise item
                    sink.publish(item)

        return Watch()


class FirstBalancer:
    """Picks the first endpoint not excluded; records what it was told."""

    def __init__(self):
        self.outcomes = []

    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("first", "balancer")]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind, settings, upstream):
        if kind != "first":
            return None
        plugin = self

        class Pick:
            def pick(self, snapshot, request, exclude):
                for ep in snapshot.endpoints:
                    if ep not in exclude and not upstream.is_ejected(ep):
                        return ep
                upstream.count_panic()
                return snapshot.endpoints[0]

            def observe(self, outcome):
                plugin.outcomes.append(outcome)

        return Pick()


def scripted_config(**mesh):
    return {
        "mesh": {"discovery_backoff": 0.01, **mesh},
        "services": {"orders": {"discovery": "scripted", "balancer": "first"}},
    }


async def test_discovery_error_keeps_the_last_snapshot_and_is_counted(upstream):
    server = upstream("one")
    script = Scripted()
    mesh = meshcore.Mesh(
        scripted_config(), [], extra_plugins=[("scripted", script), ("first", FirstBalancer())]
    )
    async with mesh:
        up = mesh.upstream("orders")
        await script.send.send([Endpoint.parse(server.address)])
        async with mesh.client() as client:
            assert (await client.get("http://orders/")).status_code == 200
            await script.send.send(RuntimeError("registry answered garbage"))
            while up.discovery_status.errors == 0:
                await anyio.sleep(0.001)
            assert (await client.get("http://orders/")).headers["x-upstream"] == "one"
        state = mesh.state()["services"]["orders"]["discovery"]
        assert state["errors"] == 1
        assert state["state"] == "stale"
        assert "registry answered garbage" in state["last_error"]
        assert [e["id"] for e in mesh.state()["services"]["orders"]["endpoints"]] == [server.address]
        while script.watch_calls < 2:  # the watcher was restarted after its backoff
            await anyio.sleep(0.001)


async def test_first_request_waits_for_the_first_snapshot(upstream):
    server = upstream("late")
    script = Scripted()
    mesh = meshcore.Mesh(
        scripted_config(), [], extra_plugins=[("scripted", script), ("first", FirstBalancer())]
    )
    async with mesh, mesh.client() as client, anyio.create_task_group() as tg:
        got = []

        async def request():
            got.append(await client.get("http://orders/"))

        tg.start_soon(request)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        await script.send.send([Endpoint.parse(server.address)])
    assert got[0].headers["x-upstream"] == "late"


@pytest.mark.parametrize("anyio_backend", [virtual_trio()])
async def test_no_snapshot_within_discovery_timeout_is_no_endpoints_in_virtual_time(anyio_backend):
    # About virtual time, so trio only: under MockClock with autojump the 30 s pass at once.
    script = Scripted()
    mesh = meshcore.Mesh(
        scripted_config(discovery_timeout="30s"),
        [],
        extra_plugins=[("scripted", script), ("first", FirstBalancer())],
    )
    async with mesh:
        start = anyio.current_time()
        with pytest.raises(meshcore.NoEndpoints, match="discovery has not answered yet"):
            await mesh.upstream("orders").send(meshcore.Request("GET", "http://orders/"))
        assert anyio.current_time() - start == pytest.approx(30.0)


async def test_empty_snapshot_is_no_endpoints_error():
    script = Scripted()
    mesh = meshcore.Mesh(
        scripted_config(), [], extra_plugins=[("scripted", script), ("first", FirstBalancer())]
    )
    async with mesh, mesh.client() as client:
        await script.send.send([])
        with pytest.raises(meshcore.NoEndpoints, match="'orders' has no endpoints"):
            await client.get("http://orders/")


async def test_backoff_grows_after_repeated_discovery_errors():
    script = Scripted()
    mesh = meshcore.Mesh(
        scripted_config(), [], extra_plugins=[("scripted", script), ("first", FirstBalancer())]
    )
    async with mesh:
        for i in range(4):
            await script.send.send(RuntimeError(f"fail {i}"))
        while mesh.upstream("orders").discovery_status.errors < 4:
            await anyio.sleep(0.001)
    assert script.watch_calls >= 4


async def test_layers_compose_in_config_order_and_once(upstream):
    server = upstream()
    built = []
    calls = []

    class Layers:
        @meshcore.hookimpl
        def meshcore_kinds(self):
            return [meshcore.Kind("outer", "layer"), meshcore.Kind("inner", "layer")]

        @meshcore.hookimpl
        def meshcore_layer(self, kind, settings, upstream):
            if kind not in ("outer", "inner"):
                return None
            built.append(kind)

            def layer(service):
                async def wrapped(request):
                    calls.append(kind)
                    return await service(request)

                return wrapped

            return layer

    config = {"services": {"orders": static_service([server], resilience=["outer", "inner"])}}
    async with meshcore.Mesh(config, [], extra_plugins=[("layers", Layers())]) as mesh:
        async with mesh.client() as client:
            await client.get("http://orders/")
            await client.get("http://orders/")
    assert built == ["outer", "inner"]
    assert calls == ["outer", "inner", "outer", "inner"]


async def test_events_lifespans_and_clean_shutdown(upstream):
    server = upstream()
    log = []

    class Observer:
        @meshcore.hookimpl
        def meshcore_lifespan(self, mesh):
            from contextlib import asynccontextmanager

            @asynccontextmanager
            async def lifespan():
                log.append("enter")

                async def heartbeat():
                    try:
                        await anyio.sleep_forever()
                    finally:
                        log.append("heartbeat cancelled")

                mesh.task_group.start_soon(heartbeat)
                mesh.add_state("observer", lambda: {"beats": 0})
                yield
                log.append("exit")

            return lifespan()

        @meshcore.hookimpl
        def meshcore_mesh_started(self, mesh):
            log.append("started")

        @meshcore.hookimpl
        def meshcore_endpoints_changed(self, service, snapshot):
            log.append(f"endpoints {service} {len(snapshot)}")

        @meshcore.hookimpl
        def meshcore_request_finished(self, outcome):
            log.append(f"finished {outcome.endpoint.id} {outcome.status_code}")

        @meshcore.hookimpl
        def meshcore_mesh_stopping(self, mesh):
            log.append("stopping")

    config = {"services": {"orders": static_service([server])}}
    async with meshcore.Mesh(config, [], extra_plugins=[("observer", Observer())]) as mesh:
        async with mesh.client() as client:
            await client.get("http://orders/")
        assert mesh.state()["state"] == {"observer": {"beats": 0}}
    assert log == [
        "enter",
        "started",
        "endpoints orders 1",
        f"finished {server.address} 200",
        "stopping",
        "exit",
        "heartbeat cancelled",
    ]
    assert mesh.task_group.cancel_scope.cancel_called


async def test_balancer_hears_outcomes_and_terminal_counts_stats(upstream):
    a, b = upstream("a", status=503), upstream("b")
    balancer = FirstBalancer()
    config = {"services": {"orders": static_service([a, b], balancer="first")}}
    async with meshcore.Mesh(config, [], extra_plugins=[("first", balancer)]) as mesh:
        async with mesh.client() as client:
            r = await client.get("http://orders/")
            assert r.status_code == 503
            request = meshcore.Request("GET", "http://orders/")
            request.extensions["meshcore.exclude"] = {Endpoint.parse(a.address)}
            response = await mesh.send(request)
            await response.aread()
            assert response.headers.get("x-upstream") == "b"
            assert response.extensions["meshcore.endpoint"].id == b.address
        stats = mesh.upstream("orders").stats[Endpoint.parse(a.address)]
        assert (stats.requests, stats.failures, stats.consecutive_failures) == (1, 1, 1)
    assert [o.status_code for o in balancer.outcomes] == [503, 200]


async def test_ejection_expires_with_the_clock(upstream):
    server = upstream()
    config = {"services": {"orders": static_service([server])}}
    async with meshcore.Mesh(config, []) as mesh:
        up = mesh.upstream("orders")
        ep = up.snapshot.endpoints[0] if up.snapshot.endpoints else None
        while ep is None:
            await anyio.sleep(0.001)
            ep = up.snapshot.endpoints[0] if up.snapshot.endpoints else None
        up.eject(ep, 0.05)
        assert up.is_ejected(ep) and up.ejected == [ep]
        await anyio.sleep(0.06)
        assert not up.is_ejected(ep) and up.ejected == []
