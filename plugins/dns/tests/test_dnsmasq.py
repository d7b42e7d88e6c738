"""Against a real dnsmasq: requests through the mesh reach the upstreams DNS names.

Timings: dnsmasq answers with TTL 1 (`--local-ttl=1`), the plugin refreshes within
[0.1 s, 1 s], so "follows within the TTL bound" means within 1 s of dnsmasq serving the new
record, plus the time inotify takes to tell dnsmasq (a few ms): 2 s is the asserted bound.
"""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

import meshcore

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# How long the mesh may take to follow a record change: the tables refresh at least every
# 1 s; the bound is a hang guard below the 5 s a default refresh would take, with room for
# a loaded machine.
FOLLOW_BOUND = 4.0


def failures(up, kind: str) -> int:
    """A failure count from the service's `dns` state (absent until the watcher started)."""
    return up.state().get("dns", {}).get("failures", {}).get(kind, 0)


async def hits(client, service: str, count: int) -> Counter:
    seen: Counter = Counter()
    for _ in range(count):
        response = await client.get(f"http://{service}/")
        assert response.status_code == 200
        seen[response.headers["x-upstream"]] += 1
    return seen


async def test_a_records_route_requests_to_every_address(dnsmasq, servers, mesh_for, table):
    s21, _s22 = servers(2)
    dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.21", "127.0.0.22"]})
    mesh = mesh_for({"orders": table(dnsmasq.nameserver, "orders.mesh.test", port=s21.port)})
    async with mesh, mesh.client() as client:
        assert await hits(client, "orders", 10) == {"s21": 5, "s22": 5}
        state = mesh.state()["services"]["orders"]
        assert state["dns"]["resolved"] is True
        assert state["dns"]["last_ttl"] == 1
        assert state["dns"]["failures_total"] == 0
        assert {e["id"] for e in state["endpoints"]} == {f"127.0.0.21:{s21.port}", f"127.0.0.22:{s21.port}"}


async def test_records_change_while_running_and_the_mesh_follows(dnsmasq, servers, mesh_for, table, wait_until):
    s21, _s22, _s23 = servers(3)
    dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.21"]})
    mesh = mesh_for({"orders": table(dnsmasq.nameserver, "orders.mesh.test", port=s21.port)})
    async with mesh, mesh.client() as client:
        assert await hits(client, "orders", 3) == {"s21": 3}
        up = mesh.upstream("orders")
        dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.22", "127.0.0.23"]})  # no restart
        await wait_until(
            lambda: {e.address for e in up.snapshot} == {"127.0.0.22", "127.0.0.23"},
            FOLLOW_BOUND,
            "the new A records in the snapshot",
        )
        assert await hits(client, "orders", 4) == {"s22": 2, "s23": 2}
        assert not s21.seen[3:]


async def test_dns_down_keeps_requests_flowing_and_updates_resume(dnsmasq, servers, mesh_for, table, wait_until):
    s21, _s22 = servers(2)
    dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.21"]})
    mesh = mesh_for({"orders": table(dnsmasq.nameserver, "orders.mesh.test", port=s21.port)})
    async with mesh, mesh.client() as client:
        assert await hits(client, "orders", 2) == {"s21": 2}
        up = mesh.upstream("orders")
        dnsmasq.stop()
        await wait_until(lambda: up.state().get("dns", {}).get("consecutive_failures", 0) >= 2, 5, "failures counted")
        # Stale beats empty: the last good set serves every request while DNS is down.
        assert await hits(client, "orders", 5) == {"s21": 5}
        state = mesh.state()["services"]["orders"]
        failures = state["dns"]["failures"]
        assert failures["timeout"] + failures["unreachable"] >= 2, failures
        assert state["discovery"]["state"] == "stale"
        assert state["discovery"]["errors"] >= 2
        assert state["dns"]["last_error"]
        # It comes back with a different record: updates resume.
        dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.22"]})
        dnsmasq.start()
        await wait_until(
            lambda: [e.address for e in up.snapshot] == ["127.0.0.22"], 5, "updates after DNS is back"
        )
        assert await hits(client, "orders", 2) == {"s22": 2}
        assert mesh.state()["services"]["orders"]["discovery"]["state"] == "ok"
        assert up.state()["dns"]["consecutive_failures"] == 0


async def test_srv_priority_and_weights_follow_rfc2782(dnsmasq_factory, servers, mesh_for, table, wait_until):
    (a,) = servers(1, first=31)
    (b,) = servers(1, first=32)
    (c,) = servers(1, first=33)
    hosts = {"a.mesh.test": ["127.0.0.31"], "b.mesh.test": ["127.0.0.32"], "c.mesh.test": ["127.0.0.33"]}
    name = "_http._tcp.orders.mesh.test"
    dnsmasq = dnsmasq_factory(
        hosts=hosts,
        srv=[
            (name, "a.mesh.test", a.port, 10, 3),
            (name, "b.mesh.test", b.port, 10, 1),
            (name, "c.mesh.test", c.port, 20, 50),  # a higher priority value: the backup
        ],
    )
    mesh = mesh_for({"orders": table(dnsmasq.nameserver, name, type="SRV")})
    async with mesh, mesh.client() as client:
        # Lowest priority group only, shares by weight (3:1); the backup gets nothing.
        assert await hits(client, "orders", 40) == {"s31": 30, "s32": 10}
        endpoints = {e["address"]: e["weight"] for e in mesh.state()["services"]["orders"]["endpoints"]}
        assert endpoints == {"127.0.0.31": 3, "127.0.0.32": 1}
        # Targets came from the Additional section: no A lookups of a.mesh.test etc.
        assert dnsmasq.queries("a.mesh.test") == 0
        assert dnsmasq.queries(name, "SRV") >= 1
        # The priority-10 targets stop resolving: the priority-20 group takes over.
        dnsmasq.set_hosts({"c.mesh.test": ["127.0.0.33"]})
        up = mesh.upstream("orders")
        await wait_until(lambda: [e.address for e in up.snapshot] == ["127.0.0.33"], FOLLOW_BOUND, "failover")
        assert await hits(client, "orders", 3) == {"s33": 3}
        # SRV records change with a restart of dnsmasq (they live on its command line).
        dnsmasq.set_hosts(hosts)
        dnsmasq.restart(srv=[(name, "b.mesh.test", b.port, 5, 1)])
        await wait_until(lambda: [e.address for e in up.snapshot] == ["127.0.0.32"], 5, "new SRV set")
        assert await hits(client, "orders", 2) == {"s32": 2}


async def test_srv_weight_zero(dnsmasq_factory, servers, mesh_for, table, wait_until):
    (a,) = servers(1, first=41)
    (b,) = servers(1, first=42)
    name = "_http._tcp.zero.mesh.test"
    dnsmasq = dnsmasq_factory(
        hosts={"a.mesh.test": ["127.0.0.41"], "b.mesh.test": ["127.0.0.42"]},
        srv=[(name, "a.mesh.test", a.port, 1, 0), (name, "b.mesh.test", b.port, 1, 2)],
    )
    mesh = mesh_for({"zero": table(dnsmasq.nameserver, name, type="SRV")})
    async with mesh, mesh.client() as client:
        # Weight 0 beside weight > 0: the weight-0 target is the last resort (RFC 2782).
        assert await hits(client, "zero", 6) == {"s42": 6}
        assert {e.address: e.weight for e in mesh.upstream("zero").snapshot} == {"127.0.0.41": 0, "127.0.0.42": 2}
        # All weights 0: equal chance.
        dnsmasq.restart(srv=[(name, "a.mesh.test", a.port, 1, 0), (name, "b.mesh.test", b.port, 1, 0)])
        up = mesh.upstream("zero")
        await wait_until(lambda: {e.weight for e in up.snapshot} == {0}, 5, "all-zero weights")
        assert await hits(client, "zero", 6) == {"s41": 3, "s42": 3}


async def test_ttl_zero_does_not_busy_loop(dnsmasq_factory, servers, mesh_for, table):
    (s,) = servers(1)
    dnsmasq = dnsmasq_factory(local_ttl=0, hosts={"orders.mesh.test": ["127.0.0.21"]})
    settings = table(dnsmasq.nameserver, "orders.mesh.test", port=s.port, min_refresh=0.25)
    mesh = mesh_for({"orders": settings})
    async with mesh:
        await mesh.upstream("orders").wait_ready(5)
        start = dnsmasq.queries("orders.mesh.test")
        await anyio.sleep(1.0)
        queries = dnsmasq.queries("orders.mesh.test") - start
        assert mesh.state()["services"]["orders"]["dns"]["last_ttl"] == 0
    # TTL 0 -> one resolution per min_refresh (0.25 s): about 4 in 1 s, never hundreds.
    assert 2 <= queries <= 6, queries


async def test_nxdomain_for_a_name_that_never_resolved(dnsmasq, mesh_for, table, wait_until):
    mesh = mesh_for({"orders": table(dnsmasq.nameserver, "nope.mesh.test", port=80)}, discovery_timeout=0.5)
    async with mesh, mesh.client() as client:
        up = mesh.upstream("orders")
        await wait_until(lambda: failures(up, "nxdomain") >= 1, 5, "nxdomain counted")
        state = mesh.state()["services"]["orders"]
        assert state["discovery"]["state"] == "waiting"
        assert "NXDOMAIN" in state["discovery"]["last_error"]
        assert "never resolved" in state["dns"]["last_error"]
        with pytest.raises(meshcore.NoEndpoints, match="NXDOMAIN"):
            await client.get("http://orders/")


async def test_empty_answer_is_counted(dnsmasq, mesh_for, table, wait_until):
    dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.21"]})
    mesh = mesh_for({"orders": table(dnsmasq.nameserver, "orders.mesh.test", type="AAAA", port=80)})
    async with mesh:
        up = mesh.upstream("orders")
        await wait_until(lambda: failures(up, "empty") >= 1, 5, "empty counted")
        assert not up.snapshot.endpoints


async def test_refused_outside_the_local_domain_is_counted(dnsmasq, mesh_for, table, wait_until):
    # dnsmasq with --no-resolv answers REFUSED for names it has no authority for.
    mesh = mesh_for({"orders": table(dnsmasq.nameserver, "orders.elsewhere.test", port=80)})
    async with mesh:
        up = mesh.upstream("orders")
        await wait_until(lambda: failures(up, "refused") >= 1, 5, "refused counted")


async def test_resolve_once(dnsmasq, servers, table):
    from meshcore_dns import DnsDiscovery, DnsError

    dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.21", "127.0.0.22"]})
    ok = DnsDiscovery("orders", name="orders.mesh.test", port=8080, nameservers=[("127.0.0.1", dnsmasq.port)])
    assert [e.id for e in await ok.resolve_once()] == ["127.0.0.21:8080", "127.0.0.22:8080"]
    missing = DnsDiscovery("orders", name="nope.mesh.test", port=8080, nameservers=[("127.0.0.1", dnsmasq.port)])
    with pytest.raises(DnsError, match="NXDOMAIN: nope.mesh.test A does not exist .*never resolved") as info:
        await missing.resolve_once()
    assert info.value.kind == "nxdomain"
