"""Admin listener: /live, /ready, /metrics (Prometheus text), /state (JSON)."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

import meshcore
from meshcore._sidecar._runtime import Sidecar
from meshcore.testing import static_service

from .conftest import admin_json, running_sidecar, sidecar_config, url

pytestmark = pytest.mark.anyio


class Never:
    """Discovery that never answers, and a layer that reports breaker states and plugin state."""

    def __init__(self):
        self.upstreams = {}

    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("never", "discovery"), meshcore.Kind("fake-breaker", "layer")]

    @meshcore.hookimpl
    def meshcore_discovery(self, kind, settings, service):
        if kind != "never":
            return None

        class Watch:
            async def watch(self, sink):
                await anyio.sleep_forever()

        return Watch()

    @meshcore.hookimpl
    def meshcore_layer(self, kind, settings, upstream):
        if kind != "fake-breaker":
            return None
        self.upstreams[upstream.name] = upstream
        counters = {"budget_denied": 3, "open": False, "cert": {"identity": "spiffe://t/ns/a/sa/x", "not_after": 1893456000}}
        upstream.add_state("fake-breaker", lambda: counters)
        return lambda inner: inner


def _samples(text):
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_live_ready_and_readiness_waits_for_discovery(upstream):
    config = sidecar_config(
        {"orders": static_service([upstream()]), "later": {"discovery": "never"}}
    )
    async with running_sidecar(config, extra_plugins=[("never", Never())]) as sidecar:
        async with httpx.AsyncClient() as client:
            assert (await client.get(url(sidecar, "admin", "/live"))).status_code == 200
            r = await client.get(url(sidecar, "admin", "/ready"))
            assert r.status_code == 503 and "first discovery snapshot" in r.text
            sidecar.generation.mesh.upstream("later").publish([meshcore.Endpoint("127.0.0.1", 1)])
            assert (await client.get(url(sidecar, "admin", "/ready"))).status_code == 200
            assert (await client.post(url(sidecar, "admin", "/ready"))).status_code == 405
            r = await client.get(url(sidecar, "admin", "/nope"))
            assert r.status_code == 404 and "/metrics" in r.text


async def test_metrics_count_requests_attempts_states_and_plugin_state(upstream):
    ok, failing = upstream("ok"), upstream("bad", status=503)
    plugin = Never()
    config = sidecar_config(
        {
            "orders": static_service([ok], resilience=["fake-breaker"]),
            "flaky": static_service([failing]),
        },
        service="me",
    )
    async with running_sidecar(config, extra_plugins=[("never", plugin)]) as sidecar:
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
            await client.get(url(sidecar, "outbound", "/"), headers={"host": "flaky"})
            await client.get(url(sidecar, "outbound", "/"), headers={"host": "elsewhere"})
            await client.get(url(sidecar, "inbound", "/"))  # the app (127.0.0.1:8080) is not there
            plugin.upstreams["orders"].emit_state("breaker", "orders", "closed", "open")
            plugin.upstreams["orders"].eject(sidecar.generation.mesh.upstream("orders").snapshot.endpoints[0], 30)
            r = await client.get(url(sidecar, "admin", "/metrics"))
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        m = _samples(r.text)
    assert m['meshcore_request_total{direction="outbound",service="orders",status_code="200",status_class="2xx",peer_identity="",tls="false"}'] == 3
    assert m['meshcore_request_total{direction="outbound",service="flaky",status_code="503",status_class="5xx",peer_identity="",tls="false"}'] == 1
    assert m['meshcore_request_total{direction="outbound",service="unknown",status_code="404",status_class="4xx",peer_identity="",tls="false"}'] == 1
    assert m['meshcore_request_total{direction="inbound",service="me",status_code="503",status_class="5xx",peer_identity="",tls="false"}'] == 1
    assert m['meshcore_local_response_total{direction="inbound",service="me",reason="app_unreachable",status_code="503"}'] == 1
    assert m['meshcore_local_response_total{direction="outbound",service="unknown",reason="no_route",status_code="404"}'] == 1
    assert m[f'meshcore_response_total{{service="orders",endpoint="{ok.address}",status_class="2xx"}}'] == 3
    assert m[f'meshcore_response_total{{service="flaky",endpoint="{failing.address}",status_class="5xx"}}'] == 1
    assert m['meshcore_response_latency_seconds_count{direction="outbound",service="orders"}'] == 3
    assert m['meshcore_response_latency_seconds_bucket{direction="outbound",service="orders",le="+Inf"}'] == 3
    assert m['meshcore_retries_total{service="orders"}'] == 0
    assert m['meshcore_breaker_open{service="orders",subject="orders"}'] == 1
    assert m['meshcore_state_changes_total{service="orders",component="ejection",state="ejected"}'] == 1
    assert m['meshcore_endpoints_ejected{service="orders"}'] == 1
    assert m['meshcore_endpoints{service="orders"}'] == 1
    assert m['meshcore_discovery_errors_total{service="orders"}'] == 0
    assert m['meshcore_discovery_snapshot_age_seconds{service="orders"}'] >= 0
    assert m['meshcore_plugin_state{service="orders",plugin="fake-breaker",key="budget_denied"}'] == 3
    assert m['meshcore_identity_cert_expiration_timestamp_seconds{identity="spiffe://t/ns/a/sa/x"}'] == 1893456000
    assert m['meshcore_sidecar_connections_total{listener="outbound"}'] == 1
    assert m["meshcore_sidecar_draining"] == 0
    assert 1e6 < m["process_resident_memory_bytes"] < 1e9
    # buckets are cumulative
    text = r.text
    buckets = [float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith('meshcore_response_latency_seconds_bucket{direction="outbound",service="orders"')]
    assert buckets == sorted(buckets) and len(buckets) == 16


async def test_state_json_has_services_endpoints_plugins_and_sidecar(upstream):
    server = upstream()
    config = sidecar_config({"orders": static_service([server])}, service="me")
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient() as client:
            await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
        state = await admin_json(sidecar)
    assert state["plugins"][:2] == ["static", "sidecar"]
    orders = state["services"]["orders"]
    assert orders["discovery"]["state"] == "ok"
    assert orders["endpoints"][0]["id"] == server.address
    assert orders["endpoints"][0]["requests"] == 1
    side = state["sidecar"]
    assert side["service"] == "me" and side["ready"] is True and side["generation"] == 1
    assert abs(side["time"] - time.time()) < 60 and side["started"] <= side["time"]
    assert side["uptime"] == pytest.approx(side["time"] - side["started"])
    assert set(side["listeners"]) == {"outbound", "inbound", "admin"}
    assert side["connections_open"]["admin"] == 1


def test_admin_off_loopback_needs_an_explicit_setting():
    with pytest.raises(meshcore.ConfigError, match="sidecar.admin: .*admin_bind_any = true"):
        Sidecar({"sidecar": {"admin": "0.0.0.0:0"}}, [])
    Sidecar({"sidecar": {"admin": "0.0.0.0:0", "admin_bind_any": True}}, [])


def test_sidecar_section_is_validated_with_key_paths():
    with pytest.raises(meshcore.ConfigError, match=r"sidecar.outbound: .*host:port"):
        Sidecar({"sidecar": {"outbound": "nope"}}, [])
    with pytest.raises(meshcore.ConfigError, match=r"sidecar.drian: unknown setting"):
        Sidecar({"sidecar": {"drian": 3}}, [])
    with pytest.raises(meshcore.ConfigError, match=r"sidecar.max_connections"):
        Sidecar({"sidecar": {"max_connections": 0}}, [])
