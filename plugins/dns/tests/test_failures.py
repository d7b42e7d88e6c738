"""Failures a DNS server produces on demand only when scripted: the `fake_dns` responder.

Each case starts healthy (A record -> a real upstream), then the server turns bad while
requests flow: the last good set keeps serving, the failure is counted under its kind and
shown in mesh.state(), and when the server is healthy again updates resume.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio


def failures(up, kind: str) -> int:
    return up.state().get("dns", {}).get("failures", {}).get(kind, 0)


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("servfail", "servfail"),
        ("refused", "refused"),
        ("silent", "timeout"),
        ("malformed", "malformed"),
        ("srv-port0", "empty"),  # an A query against an SRV-only zone: no data
    ],
)
async def test_failure_keeps_last_good_set_and_is_counted(fake_dns, servers, mesh_for, table, wait_until, mode, kind):
    s21, _s22 = servers(2)
    fake_dns.addresses = ["127.0.0.21"]
    mesh = mesh_for({"orders": table(fake_dns.nameserver, "orders.mesh.test", port=s21.port)})
    async with mesh, mesh.client() as client:
        assert (await client.get("http://orders/")).headers["x-upstream"] == "s21"
        up = mesh.upstream("orders")
        fake_dns.mode = mode
        await wait_until(lambda: failures(up, kind) >= 2, 5, f"two {kind} failures")
        for _ in range(3):
            assert (await client.get("http://orders/")).headers["x-upstream"] == "s21"
        state = mesh.state()["services"]["orders"]
        assert state["discovery"]["state"] == "stale"
        assert state["dns"]["last_error_kind"] == kind
        assert [e["address"] for e in state["endpoints"]] == ["127.0.0.21"]
        # Healthy again, with a new address: the mesh follows.
        fake_dns.addresses = ["127.0.0.22"]
        fake_dns.mode = "a"
        await wait_until(lambda: [e.address for e in up.snapshot] == ["127.0.0.22"], 5, "recovery")
        assert (await client.get("http://orders/")).headers["x-upstream"] == "s22"


async def test_failure_backoff_grows_and_is_bounded(fake_dns, mesh_for, table, wait_until):
    fake_dns.mode = "servfail"
    settings = table(fake_dns.nameserver, "orders.mesh.test", port=80, min_refresh=0.1, backoff_max=0.4)
    mesh = mesh_for({"orders": settings})
    async with mesh:
        up = mesh.upstream("orders")
        await wait_until(lambda: failures(up, "servfail") >= 4, 5, "four failures")
        waits = up.state()["dns"]["next_refresh_in"]
    # Backoff after n failures: min_refresh * 2**(n-1), capped at backoff_max, jitter 50-100 %.
    assert 0.1 <= waits <= 0.4
    assert len(fake_dns.questions) <= 12


async def test_srv_malformed_records_are_counted(fake_dns, mesh_for, table, wait_until):
    fake_dns.mode = "srv-port0"
    mesh = mesh_for({"orders": table(fake_dns.nameserver, "_http._tcp.orders.mesh.test", type="SRV")})
    async with mesh:
        up = mesh.upstream("orders")
        await wait_until(lambda: failures(up, "malformed") >= 1, 5, "malformed SRV counted")
        assert "port 0" in up.state()["dns"]["last_error"]


async def test_srv_targets_without_glue_are_looked_up(fake_dns, servers, mesh_for, table):
    s21, _s22 = servers(2)
    fake_dns.mode = "srv-noglue"
    fake_dns.srv_port = s21.port
    fake_dns.addresses = ["127.0.0.21", "127.0.0.22"]
    settings = table(fake_dns.nameserver, "_http._tcp.orders.mesh.test", type="SRV", target_types=["A"])
    mesh = mesh_for({"orders": settings})
    async with mesh, mesh.client() as client:
        seen = {(await client.get("http://orders/")).headers["x-upstream"] for _ in range(4)}
        assert seen == {"s21", "s22"}
        assert ("target.mesh.test.", "A") in fake_dns.questions
        assert {e.weight for e in mesh.upstream("orders").snapshot} == {5}


async def test_srv_target_with_only_ipv4_serves_ipv4(fake_dns, mesh_for, table):
    fake_dns.mode = "srv-noglue"
    settings = table(fake_dns.nameserver, "_http._tcp.orders.mesh.test", type="SRV", target_types=["A", "AAAA"])
    mesh = mesh_for({"orders": settings})
    async with mesh:
        up = mesh.upstream("orders")
        await up.wait_ready(5)
        # A answers, AAAA gets an empty answer: the target still has its IPv4 address.
        assert [e.address for e in up.snapshot] == ["127.0.0.21"]
        assert failures(up, "target") == 0


async def test_srv_target_that_does_not_resolve_is_counted(fake_dns, mesh_for, table, wait_until):
    fake_dns.mode = "srv-noglue"
    settings = table(fake_dns.nameserver, "_http._tcp.orders.mesh.test", type="SRV", target_types=["AAAA"])
    mesh = mesh_for({"orders": settings})
    async with mesh:
        up = mesh.upstream("orders")
        await wait_until(lambda: failures(up, "empty") >= 1, 5, "no usable target")
        assert failures(up, "target") >= 1
        assert "SRV target target.mesh.test. did not resolve" in up.state()["dns"]["last_error"]
        assert not up.snapshot.endpoints


async def test_srv_dot_means_unavailable_and_publishes_empty(fake_dns, mesh_for, table, wait_until):
    import meshcore

    fake_dns.mode = "srv-dot"
    mesh = mesh_for({"orders": table(fake_dns.nameserver, "_http._tcp.orders.mesh.test", type="SRV")})
    async with mesh, mesh.client() as client:
        await mesh.upstream("orders").wait_ready(5)
        assert mesh.state()["services"]["orders"]["discovery"]["state"] == "ok"
        with pytest.raises(meshcore.NoEndpoints, match="discovery reports no endpoints"):
            await client.get("http://orders/")
