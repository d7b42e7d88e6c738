"""Many services on one agent: one shared client and one shared watch of /v1/health/state/any
(a bounded number of connections, whatever the number of services), targeted reads of the
services whose checks moved, and the shared watch surviving what a real agent may send.
Behaviour only: the figures are plugins/consul/bench/scale.py's."""

from __future__ import annotations

import json

import anyio
import pytest
from consul_testkit import InlineRoundRobin, ports, register, response
from meshcore_consul import Registry, check_fingerprints

import meshcore

pytestmark = pytest.mark.anyio

SERVICES = 1000


def health_entry(port: int) -> dict:
    return {"Node": {"Address": "127.0.0.1"}, "Service": {"ID": f"api-{port}", "Port": port, "Address": ""},
            "Checks": [{"Status": "passing"}]}


def state_entry(service: str, port: int, modify: int, status: str = "passing") -> dict:
    return {"Node": "n1", "CheckID": f"service:{service}-{port}", "ServiceID": f"{service}-{port}",
            "ServiceName": service, "Status": status, "ModifyIndex": modify}


async def test_a_thousand_services_share_one_watch_on_few_connections(watcher):
    with Registry(port=0, open_access=True) as registry:
        for s in range(SERVICES):
            for port in (7001, 7002):
                register(registry, f"s{s}", port, ttl="1h")
        services = {f"s{s}": {"discovery": "consul", "balancer": "test-rr", "consul": {"address": registry.url}}
                    for s in range(SERVICES)}
        async with meshcore.Mesh({"services": services}, ["consul"],
                                 extra_plugins=[("test-rr", InlineRoundRobin()), ("watcher", watcher)]) as mesh:
            for upstream in mesh.upstreams.values():
                await upstream.wait_ready(60)
            assert all(ports(u.snapshot) == {7001, 7002} for u in mesh.upstreams.values())
            # Bounded whatever the number of services: the watch, READS targeted reads and the
            # few services that started before the watch was shared.
            assert registry.connections <= 50, registry.connections
            state = mesh.state()["services"]
            shared = [name for name, s in state.items() if s["consul"]["mode"] == "shared"]
            assert len(shared) >= SERVICES - 16
            watch = state["s999"]["consul"]["watch"]
            assert watch["services"] == len(shared) and watch["errors"] == 0
            reads_before = sum(s["consul"]["requests"] for s in state.values())

            # One check turns critical: only that service is read again, and its snapshot follows.
            await anyio.to_thread.run_sync(registry.catalog.update_check, "service:s500-7002", "critical", "down")
            await watcher.until("s500", lambda snap: ports(snap) == {7001}, timeout=10)
            await anyio.to_thread.run_sync(registry.catalog.update_check, "service:s500-7002", "passing", "")
            await watcher.until("s500", lambda snap: ports(snap) == {7001, 7002}, timeout=10)
            # A new instance with a check shows up the same way.
            await anyio.to_thread.run_sync(lambda: register(registry, "s7", 7003, ttl="1h"))
            await watcher.until("s7", lambda snap: ports(snap) == {7001, 7002, 7003}, timeout=10)
            state = mesh.state()["services"]
            reads = sum(s["consul"]["requests"] for s in state.values()) - reads_before
            assert reads < 20, f"{reads} reads for three changes of two services"
            assert state["s999"]["consul"]["watch"]["sweeps"] == 0

            # An instance without any check moves no check: every service is read again.
            await anyio.to_thread.run_sync(lambda: register(registry, "s8", 7004))
            await watcher.until("s8", lambda snap: 7004 in ports(snap), timeout=30)
            assert mesh.state()["services"]["s999"]["consul"]["watch"]["sweeps"] >= 1
            assert registry.connections <= 50, registry.connections


def test_fingerprints_per_service_and_node_checks_apart():
    answer = [state_entry("api", 1, 5), state_entry("api", 2, 6), state_entry("db", 1, 7),
              {"Node": "n1", "CheckID": "serfHealth", "ServiceID": "", "ServiceName": "", "Status": "passing",
               "ModifyIndex": 1}]
    fp = check_fingerprints(answer)
    assert set(fp) == {"api", "db", ""}
    moved = [*answer[:1], state_entry("api", 2, 8, "critical"), *answer[2:]]
    changed = {k for k in fp if check_fingerprints(moved).get(k) != fp[k]}
    assert changed == {"api"}
    skipped: list[str] = []
    assert set(check_fingerprints([*answer, "junk", {"Status": 3}], skipped)) == {"api", "db", ""}
    assert len(skipped) == 2
    with pytest.raises(Exception, match="every check is malformed"):
        check_fingerprints(["junk"])
    with pytest.raises(Exception, match="expected a JSON array"):
        check_fingerprints({"not": "a list"})


async def test_shared_watch_survives_garbage_and_an_index_going_backwards(raw_server, consul_mesh, watcher):
    """The shared watch (shared_above = 0) against scripted answers: a malformed state answer
    is counted and the endpoints kept; an index going backwards reads the service again."""
    states = [
        response(json.dumps([state_entry("api", 7001, 10)]), index=10),
        response("<html>oops</html>", index=11),
        response(json.dumps([state_entry("api", 7002, 12)]), index=12),
        response(json.dumps([state_entry("api", 7002, 12)]), index=3),  # went backwards
    ]
    services = [response(json.dumps([health_entry(7001)]), index=10),
                response(json.dumps([health_entry(7002)]), index=12)]
    counts = {"state": 0, "service": 0}
    seen_state: list[bytes] = []

    def answer(head: bytes) -> bytes:
        if head.startswith(b"GET /v1/health/state/any"):
            seen_state.append(head.split(b"\r\n")[0])
            n = counts["state"] = counts["state"] + 1
            return states[min(n, len(states)) - 1]  # the last repeats (churn-limited)
        n = counts["service"] = counts["service"] + 1
        return services[min(n, len(services)) - 1]

    server = raw_server([answer])
    async with consul_mesh(server.url, shared_above=0, backoff=0.01, max_backoff=0.02, wait=600) as mesh:
        await watcher.until("api", lambda snap: ports(snap) == {7002}, timeout=10)
        with anyio.fail_after(10):
            while counts["state"] < 5:
                await anyio.sleep(0.01)
        state = mesh.state()["services"]["api"]["consul"]
    assert state["mode"] == "shared"
    assert state["watch"]["errors"] >= 1 and state["errors"] >= 1
    assert [ports(s) for _, svc, s in watcher.history if svc == "api"][0] == {7001}
    # after the error the query started over without an index; after index 3 (< 12) too
    assert b"index=" not in seen_state[0] and b"index=" not in seen_state[2]
    assert b"index=" not in seen_state[4]
