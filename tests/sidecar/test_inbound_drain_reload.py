"""Inbound listener (authorization, forwarding to the app), drain and reload, in process."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest

import meshcore
from meshcore.testing import static_service

from .conftest import open_connections, running_sidecar, sidecar_config, url, wait_for

pytestmark = pytest.mark.anyio


class Policy:
    """An inline security plugin: denies /secret with a reason, records what it was asked."""

    def __init__(self):
        self.asked = []

    @meshcore.hookimpl
    def meshcore_authorize(self, request, peer):
        self.asked.append((request.method, request.url.path, peer))
        if request.url.path.startswith("/secret"):
            return "no rule allows GET /secret"
        return None


async def test_inbound_forwards_to_the_app_and_authorizes(upstream):
    app = upstream("app")
    policy = Policy()
    config = sidecar_config({}, app=app.address, service="me")
    async with running_sidecar(config, extra_plugins=[("policy", policy)]) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.post(
                url(sidecar, "inbound", "/echo"),
                content=b"payload",
                headers={"x-forwarded-client-cert": "URI=spiffe://forged", "connection": "keep-alive, x-drop", "x-drop": "1"},
            )
            assert (r.status_code, r.text, r.headers["x-upstream"]) == (200, "payload", "app")
            seen = app.seen[-1][2]
            assert "x-forwarded-client-cert" not in seen  # only the sidecar may say who called
            assert "x-drop" not in seen and seen["via"] == "1.1 meshcore"
            r = await client.get(url(sidecar, "inbound", "/secret/x"))
            assert r.status_code == 403
            assert r.headers["x-meshcore-error"] == "denied"
            assert "no rule allows GET /secret" in r.text
        assert [a[:2] for a in policy.asked] == [("POST", "/echo"), ("GET", "/secret/x")]
        assert policy.asked[0][2] is None  # plain TCP: no TLS peer
        assert sidecar.telemetry.denied == 1
        assert app.requests == 1


async def test_inbound_app_down_is_503_and_slow_app_is_504(upstream):
    app = upstream("app", delay=1.0)
    config = sidecar_config({}, app=app.address, app_read_timeout=0.2)
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.get(url(sidecar, "inbound", "/"))
            assert (r.status_code, r.headers["x-meshcore-error"]) == (504, "timeout")
            app.stop()
            r = await client.get(url(sidecar, "inbound", "/"))
            assert (r.status_code, r.headers["x-meshcore-error"]) == (503, "app_unreachable")


async def test_drain_finishes_in_flight_refuses_new_and_closes_idle(upstream, caplog):
    caplog.set_level(logging.WARNING, logger="meshcore.sidecar")
    server = upstream("slow")
    config = sidecar_config({"orders": static_service([server])}, drain=5)
    async with running_sidecar(config) as sidecar:
        address = sidecar.addresses["outbound"]
        results = {}
        async with httpx.AsyncClient(timeout=10) as slow_client, httpx.AsyncClient() as idle_client:
            await idle_client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
            assert open_connections(sidecar)["outbound"] == 1  # idle keep-alive connection

            async def slow():
                r = await slow_client.get(url(sidecar, "outbound", "/delay/0.5"), headers={"host": "orders"})
                results["slow"] = r

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await wait_for(lambda: server.requests == 2 and sidecar.in_flight == 1)
                start = anyio.current_time()
                drained = anyio.Event()

                async def drain():
                    await sidecar.drain()
                    drained.set()

                tg.start_soon(drain)
                await wait_for(lambda: open_connections(sidecar)["outbound"] == 1)  # idle one closed
                with pytest.raises(OSError):
                    await anyio.connect_tcp(address.host, address.port)
                async with httpx.AsyncClient() as admin:
                    assert (await admin.get(url(sidecar, "admin", "/ready"))).status_code == 503
                await drained.wait()
                elapsed = anyio.current_time() - start
        r = results["slow"]
        assert r.status_code == 200 and r.headers["x-upstream"] == "slow"
        # It waited for the request in flight, and that request, not the 5 s deadline, ended it.
        assert 0.2 < elapsed
        assert "drain deadline" not in caplog.text
        assert open_connections(sidecar)["outbound"] == 0


async def test_drain_deadline_cuts_what_is_left(upstream, caplog):
    caplog.set_level(logging.WARNING, logger="meshcore.sidecar")
    server = upstream("slow")
    config = sidecar_config({"orders": static_service([server])}, drain=0.2)
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient(timeout=10) as client:
            async with anyio.create_task_group() as tg:
                errors = []

                async def slow():
                    try:
                        await client.get(url(sidecar, "outbound", "/delay/3"), headers={"host": "orders"})
                    except httpx.HTTPError as exc:
                        errors.append(exc)

                tg.start_soon(slow)
                await wait_for(lambda: server.requests == 1)
                await sidecar.drain()
        # The 0.2 s drain deadline cut the request: it would have answered after 3 s.
        assert errors and sidecar.in_flight == 0
        assert "drain deadline (0.2 s) passed with 1 requests in flight" in caplog.text


async def test_reload_switches_config_without_dropping_connections(upstream):
    old, new = upstream("old"), upstream("new")
    config = sidecar_config({"orders": static_service([old])})
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient(timeout=10) as client:
            in_flight = {}

            async def slow():
                in_flight["r"] = await client.get(url(sidecar, "outbound", "/delay/0.3"), headers={"host": "orders"})

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await wait_for(lambda: old.requests == 1)
                first = sidecar.generation
                error = await sidecar.reload(sidecar_config({"orders": static_service([new]), "users": static_service([new])}))
                assert error is None
                assert sidecar.generation is not first and sidecar.generation.number == 2
                r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "users"})
                assert r.headers["x-upstream"] == "new"
            assert in_flight["r"].headers["x-upstream"] == "old"  # finished on the old generation
            await wait_for(lambda: first.stopped.is_set())
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
            assert r.headers["x-upstream"] == "new"
            # both keep-alive connections (the slow one and the concurrent one) survived
            assert sidecar.telemetry.connections_total["outbound"] == 2
            assert open_connections(sidecar)["outbound"] == 2


async def test_bad_reload_is_refused_and_the_old_config_keeps_serving(upstream):
    server = upstream("one")
    config = sidecar_config({"orders": static_service([server])})
    async with running_sidecar(config) as sidecar:
        error = await sidecar.reload({"services": {"orders": {"discovery": "nope"}}, "sidecar": config["sidecar"]})
        assert "services.orders.discovery: unknown discovery kind 'nope'" in error
        error = await sidecar.reload(sidecar_config({}, outbound="127.0.0.1:1"))
        assert "sidecar.outbound: changed from" in error and "restart" in error
        assert sidecar.generation.number == 1
        assert sidecar.telemetry.reloads == {"refused": 2}
        async with httpx.AsyncClient() as client:
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
        assert r.headers["x-upstream"] == "one"
