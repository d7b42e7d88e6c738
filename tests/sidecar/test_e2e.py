"""End to end on loopback (issue 9): app A -> sidecar A -> mTLS -> sidecar B -> app B.

Topology, all in this process, on the test's backend (asyncio and trio)::

    test client ("app A", plain HTTP, Host: app-b)
      -> sidecar A: outbound; consul discovery of app-b, round-robin, retry, breaker; mTLS as app-a
      -> sidecar B1 | B2 | B3: inbound; mTLS, policy allows only spiffe://.../sa/app-a;
                                each registers its own instance in the registry
      -> app B instances: three meshcore.testing.UpstreamServer

plus one embedded consul registry (`meshcore_consul.Registry`) and one mesh CA (`meshcore_tls.CA`).

Why one sidecar B per app-B instance: that is how a sidecar is deployed (one beside each
instance, `[sidecar] app` names exactly one local app), and it is what makes registration
faithful: each sidecar B registers *its* instance (the sidecar fills `[consul-registration]`
from `[sidecar] service` and its bound inbound address), so sidecar A discovers three endpoints
that are three inbound listeners. One shared sidecar B in front of three apps would need a
balancer inside the inbound side, which the sidecar does not have and production would not do.

Why in process and not `meshcore run` subprocesses: `Sidecar` is exactly what `meshcore run`
runs (the `run` command adds signal handling only), so in process loses nothing the test
checks, runs on both backends, and shares no ports or PIDs with anything else; every listener
binds port 0 on 127.0.0.1. Cleanup is by context manager, in dependency order: sidecar A, the
sidecars B (they deregister while the registry still answers), the apps, the registry.

"Kill one app-B instance" stops its app (its sidecar stays up, as a pod whose application
container crashed): sidecar B answers 503 `app_unreachable` (or 502 for a request cut in
flight), sidecar A's retry sends the GET to another endpoint, and its breaker ejects the dead
endpoint after 5 consecutive failures (Envoy's consecutive_5xx default), so the client never
sees an error and the dead instance gets no further traffic.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import meshcore_tls
import pytest
from meshcore_consul import Registry

from meshcore._sidecar._runtime import Sidecar

from .conftest import LOOPBACK, admin_json, url, wait_for

pytestmark = pytest.mark.anyio

TRUST_DOMAIN = "e2e.meshcore.test"
APP_A = meshcore_tls.spiffe_id(TRUST_DOMAIN, "default", "app-a")
APP_B = meshcore_tls.spiffe_id(TRUST_DOMAIN, "default", "app-b")
WORKERS = 4  # concurrent keep-alive clients of sidecar A
BEFORE_KILL = 30  # requests answered before an instance is killed
AFTER_EJECTION = 60  # requests answered after the dead instance was ejected


def sidecar_b_config(registry: Registry, ca_dir: Path, app: str) -> dict[str, Any]:
    return {
        "sidecar": {**LOOPBACK, "service": "app-b", "app": app, "drain": 1.0},
        # name/address/port/id are filled in by the sidecar: its own inbound address
        "consul-registration": {"agent": registry.url, "token": registry.token, "ttl": "10s"},
        "tls": {"ca_dir": str(ca_dir), "service": "app-b", "allow": [{"identities": [APP_A]}]},
    }


def sidecar_a_config(registry: Registry, ca_dir: Path) -> dict[str, Any]:
    # Breaker and retry at their defaults: the behaviour under test is the shipped one.
    return {
        "defaults": {"balancer": "round-robin", "resilience": ["retry", "breaker"]},
        "services": {"app-b": {"discovery": "consul", "consul": {"address": registry.url}}},
        "sidecar": {**LOOPBACK, "drain": 1.0},
        "tls": {"ca_dir": str(ca_dir), "service": "app-a"},
    }


def inbound_requests(sidecar: Sidecar) -> int:
    """Requests sidecar B answered on its inbound side, whatever the status."""
    return sum(
        n for (direction, *_), n in sidecar.telemetry.requests.items() if direction == "inbound"
    )


def samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    lines = (line.rpartition(" ") for line in text.splitlines() if line and line[0] != "#")
    return {name: float(value) for name, _, value in lines}


def intruder_context(ca_dir: Path, tmp_path: Path) -> ssl.SSLContext:
    """A client TLS context with a valid mesh certificate for another identity."""
    issued = meshcore_tls.CA.load(ca_dir, need_key=True).issue("intruder", "default")
    chain = tmp_path / "intruder.pem"
    chain.write_bytes(issued.cert_pem + issued.key_pem)
    ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    ctx.check_hostname = False  # mesh peers are identified by SPIFFE ID, not host name
    ctx.load_cert_chain(str(chain))
    return ctx


async def test_app_to_app_through_two_sidecars_survives_an_instance_kill(upstream, tmp_path):
    ca_dir = tmp_path / "ca"
    meshcore_tls.CA.create(TRUST_DOMAIN).save(ca_dir)
    apps = [upstream(f"app-b-{i}") for i in range(3)]

    async with contextlib.AsyncExitStack() as stack:
        registry = stack.enter_context(Registry(port=0, data_dir=None))
        sidecars_b = [
            await stack.enter_async_context(
                Sidecar(sidecar_b_config(registry, ca_dir, app.address), ["consul", "tls"])
            )
            for app in apps
        ]
        sidecar_a = await stack.enter_async_context(
            Sidecar(
                sidecar_a_config(registry, ca_dir),
                ["consul", "tls", "round-robin", "retry", "breaker"],
            )
        )
        upstream_b = sidecar_a.generation.mesh.upstreams["app-b"]
        inbound_ports = {s.addresses["inbound"].port for s in sidecars_b}

        # Registration by the sidecars B, discovery by sidecar A, through the registry.
        entries = registry.catalog.health_service("app-b", passing=True)
        assert {e["Service"]["Port"] for e in entries} == inbound_ports
        await wait_for(lambda: {ep.port for ep in upstream_b.snapshot.endpoints} == inbound_ports)
        await wait_for(lambda: sidecar_a.ready)

        dead_app, dead_sidecar = apps[1], sidecars_b[1]
        dead_port = dead_sidecar.addresses["inbound"].port
        answered: Counter[str] = Counter()
        failures: list[str] = []
        stop = anyio.Event()

        async def client_worker(n: int) -> None:
            # A plain-HTTP app: it knows the service name only, as `Host`.
            async with httpx.AsyncClient(
                base_url=url(sidecar_a, "outbound"), headers={"host": "app-b"}, timeout=10
            ) as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        r = await client.get(f"/items/{n}-{i}")
                    except httpx.HTTPError as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                        continue
                    if r.status_code != 200:
                        failures.append(
                            f"{r.status_code} {r.headers.get('x-meshcore-error')}: {r.text!r}"
                        )
                        continue
                    answered[r.headers["x-upstream"]] += 1

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for n in range(WORKERS):
                    tg.start_soon(client_worker, n)

                await wait_for(
                    lambda: sum(answered.values()) >= BEFORE_KILL and len(answered) == 3, timeout=10
                )
                await anyio.to_thread.run_sync(dead_app.stop)  # the app behind sidecar B1 dies
                killed_at = sum(answered.values())
                dead_endpoint = next(
                    ep for ep in upstream_b.snapshot.endpoints if ep.port == dead_port
                )
                await wait_for(lambda: upstream_b.is_ejected(dead_endpoint), timeout=10)
                dead_seen = inbound_requests(dead_sidecar)
                dead_answered = answered[dead_app.name]  # (a response may land after the kill)
                ejected_at = sum(answered.values())
                await wait_for(
                    lambda: sum(answered.values()) >= ejected_at + AFTER_EJECTION, timeout=10
                )
                stop.set()

        assert failures == [], f"client-visible errors: {failures[:5]} ({len(failures)} in all)"
        total = sum(answered.values())
        assert total >= killed_at + AFTER_EJECTION
        # The kill hit traffic: the dead instance's sidecar answered at least 5 failures (503,
        # or 502 for a request cut in flight) before the ejection, and sidecar A retried each of
        # those attempts on another instance.
        assert dead_seen >= dead_answered + 5
        assert sidecar_a.telemetry.retries().get("app-b", 0) >= 5
        # Once ejected, the dead instance gets nothing but what was already on its way.
        assert inbound_requests(dead_sidecar) - dead_seen <= WORKERS
        # The two live instances carried the rest, in turn.
        live = [a.name for a in apps if a is not dead_app]
        assert answered[dead_app.name] == dead_answered  # nothing from the dead app after ejection
        assert all(answered[name] > AFTER_EJECTION // 4 for name in live)

        # The admin API shows the ejection, the endpoints and a closed circuit.
        state = await admin_json(sidecar_a)
        service = state["services"]["app-b"]
        ejected = {ep["port"] for ep in service["endpoints"] if ep["ejected"]}
        assert ejected == {dead_port}
        assert service["breaker"]["circuit"]["state"] == "closed"
        assert service["discovery"]["errors"] == 0

        # Sidecar B's admin API shows its registration and its certificate once, mesh-wide.
        b_state = await admin_json(dead_sidecar)
        registration = b_state["state"]["consul-registration"]
        assert registration["id"] == dead_sidecar.registration["id"]
        assert (registration["status"], registration["errors"]) == ("registered", 0)
        assert b_state["state"]["tls"]["identity"] == APP_B
        async with httpx.AsyncClient() as admin:
            metrics = samples((await admin.get(url(dead_sidecar, "admin", "/metrics"))).text)
        expiry = b_state["state"]["tls"]["expires_at"]
        assert (
            metrics[f'meshcore_identity_cert_expiration_timestamp_seconds{{identity="{APP_B}"}}']
            == expiry
        )
        assert (
            metrics[
                'meshcore_plugin_state{service="",plugin="consul-registration",key="registrations"}'
            ]
            == 1
        )
        assert metrics['meshcore_plugin_state{service="",plugin="tls",key="denied"}'] == 0
        assert not [k for k in metrics if 'plugin="tls"' in k and 'service=""' not in k]
        # The golden metrics name the peer over mTLS: B counts A's calls by A's identity, A
        # counts its calls to B by B's identity (what the tls plugin verified).
        inbound_ok = (
            'meshcore_request_total{direction="inbound",service="app-b",status_code="200",'
            f'status_class="2xx",peer_identity="{APP_A}",tls="true"}}'
        )
        assert metrics[inbound_ok] >= 1
        async with httpx.AsyncClient() as admin:
            a_metrics = samples((await admin.get(url(sidecar_a, "admin", "/metrics"))).text)
        outbound_ok = (
            'meshcore_request_total{direction="outbound",service="app-b",status_code="200",'
            f'status_class="2xx",peer_identity="{APP_B}",tls="true"}}'
        )
        assert a_metrics[outbound_ok] >= 1
        assert not [k for k in a_metrics if k.startswith("meshcore_request_total") and 'tls="false"' in k]

        # mTLS all the way: app B saw A's verified identity, sidecar B allowed only that.
        for app in apps:
            assert app.seen[-1][2]["x-forwarded-client-cert"] == f"URI={APP_A}"
        for sidecar in sidecars_b:
            status = meshcore_tls.status(sidecar.generation.mesh)
            assert status["identity"] == APP_B and status["denied"] == 0
        assert meshcore_tls.status(sidecar_a.generation.mesh)["rejected_servers"] == 0

        # The policy is by identity: a valid mesh certificate of another workload is refused,
        # and a plain-HTTP client does not get past the handshake.
        live_sidecar = sidecars_b[0]
        inbound = url(live_sidecar, "inbound", "/items/x").replace("http://", "https://")
        async with httpx.AsyncClient(verify=intruder_context(ca_dir, tmp_path)) as intruder:
            r = await intruder.get(inbound)
        assert (r.status_code, r.headers["x-meshcore-error"]) == (403, "denied")
        assert meshcore_tls.status(live_sidecar.generation.mesh)["denied"] == 1
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(url(live_sidecar, "inbound", "/items/x"))
        assert live_sidecar.telemetry.local_errors[("inbound", "tls", "handshake_failed")] == 1

    # Clean shutdown: every sidecar B deregistered its instance before the registry stopped.
    assert registry.catalog.services == {}
