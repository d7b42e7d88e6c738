"""Routing on the sidecar's outbound side: splits, header-pinned routes, faults in /state and
/metrics, and a reload (the SIGHUP path) that moves traffic without dropping a request."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from .conftest import admin_json, running_sidecar, sidecar_config, url

pytestmark = pytest.mark.anyio


def orders(v1: Any, v2: Any, weights: tuple[int, int], **route: Any) -> dict[str, Any]:
    return {
        "orders": {
            "discovery": "static",
            "balancer": "round-robin",
            "static": {"endpoints": [
                {"address": v1.address, "metadata": {"version": "v1"}},
                {"address": v2.address, "metadata": {"version": "v2"}},
            ]},
            "subsets": {"v1": {"metadata": {"version": "v1"}}, "v2": {"metadata": {"version": "v2"}}},
            "routes": [
                {"name": "testers", "matches": [{"headers": [{"name": "x-tester", "value": "1"}]}],
                 "backendRefs": [{"subset": "v2"}], "fault": {"abort": {"percent": 0, "httpStatus": 503}}},
                {"name": "chaos", "matches": [{"headers": [{"name": "x-chaos", "value": "1"}]}],
                 "fault": {"abort": {"percent": 100, "httpStatus": 503}}},
                {"name": "split", "backendRefs": [
                    {"subset": "v1", "weight": weights[0]}, {"subset": "v2", "weight": weights[1]}], **route},
            ],
        }
    }


def config(v1: Any, v2: Any, weights: tuple[int, int], **route: Any) -> dict[str, Any]:
    return {**sidecar_config(orders(v1, v2, weights, **route)), "mesh": {"plugins": ["round-robin"]}}


async def test_outbound_routes_split_and_pin_and_count(upstream):
    pytest.importorskip("meshcore_roundrobin")
    v1, v2 = upstream("v1"), upstream("v2")
    async with running_sidecar(config(v1, v2, (90, 10))) as sidecar:
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(400):
                r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
                assert r.status_code == 200
            pinned = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders", "x-tester": "1"})
            aborted = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders", "x-chaos": "1"})
            metrics = (await client.get(url(sidecar, "admin", "/metrics"))).text
        state = await admin_json(sidecar)
    assert pinned.headers["x-upstream"] == "v2"
    assert aborted.status_code == 503 and aborted.text == "fault filter abort\n"
    # 90 % of 400 is 360 with a standard deviation of 6: the bounds are 32 above and 40 below
    assert 0.80 <= v1.requests / 400 <= 0.98  # the 2,000-request bound is in tests/test_routing.py
    routes = state["services"]["orders"]["routing"]["routes"]
    assert routes[0]["FAULT_INJECTION"]["abort"]["httpStatus"] == 503
    assert sum(b["requests"] for b in routes[2]["backends"]) == 400
    line = f'meshcore_route_requests_total{{service="orders",route="split",backend="orders/v1"}} {v1.requests}'
    assert line in metrics
    assert 'meshcore_route_faults_total{service="orders",route="testers",fault="abort"} 0' in metrics
    assert 'meshcore_route_faults_total{service="orders",route="chaos",fault="abort"} 1' in metrics


async def test_a_reload_moves_traffic_without_dropping_requests(upstream):
    pytest.importorskip("meshcore_roundrobin")
    v1, v2 = upstream("v1"), upstream("v2")
    async with running_sidecar(config(v1, v2, (100, 0))) as sidecar:
        statuses: list[int] = []
        after: list[str] = []
        reloaded = anyio.Event()
        async with httpx.AsyncClient(timeout=10) as client:

            async def caller() -> None:
                while not reloaded.is_set() or len(after) < 100:
                    r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
                    statuses.append(r.status_code)
                    if reloaded.is_set():
                        after.append(r.headers["x-upstream"])

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(caller)
                while len(statuses) < 100:
                    await anyio.sleep(0.01)
                assert await sidecar.reload(config(v1, v2, (0, 100))) is None
                reloaded.set()
    assert set(statuses) == {200}
    assert v1.requests >= 100
    # requests already routed by the old generation finish there; everything after is v2
    assert after[-50:] == ["v2"] * 50


async def test_outbound_mirror_gets_copies_of_bodiless_and_small_bodies(upstream):
    primary, shadow = upstream("primary"), upstream("shadow")
    services = {
        "orders": {"discovery": "static", "static": {"endpoints": [primary.address]},
                   "routes": [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}}}]}]},
        "shadow": {"discovery": "static", "static": {"endpoints": [shadow.address]}},
    }
    async with running_sidecar(sidecar_config(services)) as sidecar:
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(5):
                r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
                assert r.headers["x-upstream"] == "primary"
            r = await client.post(url(sidecar, "outbound", "/"), headers={"host": "orders"}, content=b"order")
            assert r.headers["x-upstream"] == "primary"
        with anyio.fail_after(5):
            while shadow.requests < 6:
                await anyio.sleep(0.01)
        mirror = (await admin_json(sidecar))["services"]["orders"]["routing"]["routes"][0]["filters"][0]
    assert mirror["sent"] == 6 and mirror["dropped"] == 0


async def test_a_reload_with_a_bad_route_is_refused_with_the_key_path(upstream):
    pytest.importorskip("meshcore_roundrobin")
    v1, v2 = upstream("v1"), upstream("v2")
    async with running_sidecar(config(v1, v2, (100, 0))) as sidecar:
        error = await sidecar.reload(config(v1, v2, (0, 0)))
        assert error is not None and "services.orders.routes[2].backendRefs" in str(error)
        assert "sum to 0" in str(error)
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
        assert r.headers["x-upstream"] == "v1"  # the old routes keep serving
