"""An independent client, py-consul, against the embedded registry: it registers (lowercase
keys), heartbeats and queries (blocking included), and meshcore discovers what it registered."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from consul_testkit import ports

from meshcore.testing import strict_integration

try:
    import consul
except ImportError:  # a test dependency (meshcore-servicemesh-consul[test]); CI must have it
    if strict_integration():
        raise
    pytest.skip("py-consul is not installed: pip install py-consul", allow_module_level=True)

pytestmark = pytest.mark.anyio


def client(registry, **kw):
    return consul.Consul(host="127.0.0.1", port=registry.port, **{"token": registry.token, **kw})


def test_py_consul_register_heartbeat_query(registry):
    c = client(registry)
    check = consul.Check.ttl("10s")
    check["DeregisterCriticalServiceAfter"] = "90s"
    assert c.agent.service.register("web", service_id="web-1", address="127.0.0.1", port=8080,
                                    tags=["blue"], meta={"version": "2"}, check=check,
                                    weights={"Passing": 7, "Warning": 1}) is True
    assert c.agent.service.register("web", service_id="web-2", address="127.0.0.1", port=8081,
                                    check=consul.Check.ttl("10s")) is True
    index, nodes = c.health.service("web", passing=True)
    assert nodes == []  # TTL checks start critical, as in Consul
    assert c.agent.check.ttl_pass("service:web-1", notes="ok") is True
    index, nodes = c.health.service("web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"]
    assert nodes[0]["Service"]["Weights"] == {"Passing": 7, "Warning": 1}
    assert registry.catalog.checks["service:web-1"].deregister_after == 90.0
    _, nodes = c.health.service("web", tag="blue")
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"]
    _, services = c.catalog.services()
    assert services["web"] == ["blue"]
    _, flat = c.catalog.service("web")
    assert {e["ServiceID"] for e in flat} == {"web-1", "web-2"}
    assert c.status.leader() == registry.address
    assert c.agent.self()["Config"]["Datacenter"] == "dc1"
    assert set(c.agent.services()) == {"web-1", "web-2"}

    # blocking query with py-consul's (index, data) protocol
    def later() -> None:
        time.sleep(0.1)
        c.agent.check.ttl_pass("service:web-2")

    threading.Thread(target=later).start()
    start = time.monotonic()
    new_index, nodes = c.health.service("web", passing=True, index=index, wait="30s")
    assert time.monotonic() - start < 20  # the change, not the 30 s wait, ended it
    assert int(new_index) > int(index) and len(nodes) == 2
    # unknown things, as py-consul sees Consul's answers
    assert c.agent.service.deregister("nope") is False  # 404 -> False in py-consul
    with pytest.raises(consul.ConsulException, match="Unknown check"):
        c.agent.check.ttl_pass("nope")
    assert c.agent.service.deregister("web-1") is True


def test_py_consul_with_acl_token():
    from meshcore_consul import Registry

    with Registry(port=0, token="tok") as registry:
        with pytest.raises(consul.ACLPermissionDenied):
            client(registry, token=None).agent.service.register("web", port=1)
        assert client(registry, token="tok").agent.service.register("web", port=1) is True


async def test_meshcore_discovers_what_py_consul_registered(registry, upstream, consul_mesh, watcher):
    servers = [upstream(f"py-{i}") for i in range(2)]
    c = client(registry)
    for s in servers:
        await anyio.to_thread.run_sync(lambda s=s: c.agent.service.register(
            "api", service_id=f"api-{s.port}", address="127.0.0.1", port=s.port,
            check=consul.Check.ttl("10s")))
        await anyio.to_thread.run_sync(c.agent.check.ttl_pass, f"service:api-{s.port}")
    async with consul_mesh(registry.url) as mesh:
        await watcher.until("api", lambda snap: ports(snap) == {s.port for s in servers})
        async with mesh.client() as http:
            seen = {(await http.get("http://api/")).headers["x-upstream"] for _ in range(4)}
        assert seen == {"py-0", "py-1"}
        # py-consul marks one failing: meshcore drops it
        await anyio.to_thread.run_sync(c.agent.check.ttl_fail, f"service:api-{servers[0].port}")
        await watcher.until("api", lambda snap: ports(snap) == {servers[1].port}, timeout=2)
