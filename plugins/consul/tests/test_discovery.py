"""The `consul` discovery kind against the embedded registry, end to end through the mesh
client with real loopback upstreams; and parsing Consul's documented answer shape."""

from __future__ import annotations

import json
import time

import anyio
import pytest
from consul_testkit import ports, register
from meshcore_consul import ConsulAnswerError, Registry, next_index, parse_health

import meshcore

# Copied from Consul's health.mdx via shared/reference/discovery-apis.md.
CONSUL_SAMPLE = """
{
  "Node": {"ID": "40e4a748-2192-161a-0510-9bf59fe950b5", "Node": "foobar", "Address": "10.1.10.12",
           "Datacenter": "dc1", "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
           "Meta": {"instance_type": "t2.medium"}},
  "Service": {"ID": "redis", "Service": "redis", "Tags": ["primary"], "Address": "10.1.10.12",
              "TaggedAddresses": {"lan": {"address": "10.1.10.12", "port": 8000},
                                  "wan": {"address": "198.18.1.2", "port": 80}},
              "Meta": {"redis_version": "4.0"}, "Port": 8000,
              "Weights": {"Passing": 10, "Warning": 1}, "Namespace": "default"},
  "Checks": [
    {"Node": "foobar", "CheckID": "service:redis", "Name": "Service 'redis' check", "Status": "passing",
     "Notes": "", "Output": "", "ServiceID": "redis", "ServiceName": "redis",
     "ServiceTags": ["primary"], "Namespace": "default"},
    {"Node": "foobar", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
     "Notes": "", "Output": "", "ServiceID": "", "ServiceName": "", "ServiceTags": [],
     "Namespace": "default"}
  ]
}
"""


# -- parsing (no I/O) ----------------------------------------------------------------------


def test_consul_documented_sample_parses():
    [ep] = parse_health([json.loads(CONSUL_SAMPLE)])
    assert (ep.address, ep.port, ep.weight) == ("10.1.10.12", 8000, 10)
    assert ep.tags == ("primary",)
    assert ep.meta == {"redis_version": "4.0"}


def test_address_falls_back_to_node_and_warning_uses_warning_weight():
    entry = json.loads(CONSUL_SAMPLE)
    entry["Service"]["Address"] = ""
    entry["Checks"][0]["Status"] = "warning"
    assert parse_health([entry]) == []  # warning only with include_warning
    [ep] = parse_health([entry], include_warning=True)
    assert (ep.address, ep.weight) == ("10.1.10.12", 1)
    entry["Checks"][1]["Status"] = "critical"  # a node check counts too
    assert parse_health([entry], include_warning=True) == []


def test_unknown_fields_are_ignored_and_defaults_apply():
    minimal = {"Service": {"Port": 80, "Address": "127.0.0.9", "Extra": {"x": [1]}}, "New": 1}
    [ep] = parse_health([minimal])
    assert (ep.address, ep.port, ep.weight, ep.tags) == ("127.0.0.9", 80, 1, ())


@pytest.mark.parametrize(
    ("mutate", "text"),
    [
        (lambda e: e["Service"].__setitem__("Port", "8000"), "Service.Port"),
        (lambda e: e["Service"].__setitem__("Port", 0), "Service.Port"),
        (lambda e: e["Service"].__setitem__("Port", True), "Service.Port"),
        (lambda e: e.__setitem__("Service", None), "Service"),
        (lambda e: e["Service"].__setitem__("Tags", "primary"), "Tags"),
        (lambda e: e["Service"].__setitem__("Meta", {"k": 1}), "Meta"),
        (lambda e: e["Service"]["Weights"].__setitem__("Passing", "ten"), "Weights.Passing"),
        (lambda e: e.__setitem__("Checks", {"a": 1}), "Checks"),
        (lambda e: e["Checks"][0].__setitem__("Status", 3), "Status"),
        (lambda e: (e["Service"].__setitem__("Address", ""), e["Node"].__setitem__("Address", "")), "Address"),
        (lambda e: e["Service"].__setitem__("Address", "10.1.10.12:8000"), "host:port"),
    ],
)
def test_a_malformed_entry_is_skipped_and_the_rest_kept(mutate, text):
    good, bad = json.loads(CONSUL_SAMPLE), json.loads(CONSUL_SAMPLE)
    mutate(bad)
    skipped: list[str] = []
    [ep] = parse_health([good, bad], skipped=skipped)
    assert (ep.address, ep.port) == ("10.1.10.12", 8000)
    assert len(skipped) == 1 and text in skipped[0] and skipped[0].startswith("entry 1")
    with pytest.raises(ConsulAnswerError, match=text):  # nothing usable at all: an error
        parse_health([bad])


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1:8080", "web\r\nX-Evil: 1", "[::1]", "host name", "a..b", "-bad.example", "x" * 254, ":::"],
)
def test_an_address_that_is_not_an_address_is_skipped(address):
    good, bad = json.loads(CONSUL_SAMPLE), json.loads(CONSUL_SAMPLE)
    bad["Service"]["Address"] = address
    skipped: list[str] = []
    assert [ep.address for ep in parse_health([bad, good], skipped=skipped)] == ["10.1.10.12"]
    assert skipped and "entry 0: address" in skipped[0]


@pytest.mark.parametrize("address", ["10.0.0.1", "::1", "fe80::1%eth0", "api-1.node.dc1.consul", "db_1", "web."])
def test_host_names_and_ip_literals_are_addresses(address):
    entry = json.loads(CONSUL_SAMPLE)
    entry["Service"]["Address"] = address
    [ep] = parse_health([entry])
    assert ep.address == address


@pytest.mark.parametrize("answer", [{}, "x", None, 3, [1], [[]]])
def test_non_list_answers_are_rejected(answer):
    with pytest.raises(ConsulAnswerError):
        parse_health(answer)


def test_blocking_index_rules():
    assert next_index(0, 5) == 5
    assert next_index(5, 5) == 5
    assert next_index(5, 9) == 9
    assert next_index(9, 3) == 0  # went backwards: reset
    assert next_index(0, 0) == 1  # never below 1
    assert next_index(0, -4) == 1


# -- against the embedded registry ---------------------------------------------------------

@pytest.mark.anyio
async def test_route_then_deregistered_instance_leaves_within_100ms(registry, upstream, consul_mesh, watcher):
    servers = [upstream(f"api-{i}") for i in range(3)]
    async with consul_mesh(registry.url) as mesh:
        for s in servers:
            register(registry, "api", s.port, ttl="30s")
        await watcher.until("api", lambda snap: len(snap) == 3)
        async with mesh.client() as client:
            seen = {(await client.get("http://api/x")).headers["x-upstream"] for _ in range(6)}
            assert seen == {"api-0", "api-1", "api-2"}
            gone = servers[1]
            await anyio.to_thread.run_sync(registry.catalog.deregister, f"api-{gone.port}")
            # The blocking query answers the change at once (well under 100 ms on a quiet
            # machine): nothing else could bring it, since a query is only renewed after its
            # 60 s wait. The time itself is not asserted, only a hang guard far below the wait.
            await watcher.until("api", lambda snap: gone.port not in ports(snap), timeout=10)
            before = len(gone.seen)
            answers = {(await client.get("http://api/y")).headers["x-upstream"] for _ in range(6)}
            assert answers == {"api-0", "api-2"} and len(gone.seen) == before
    state = mesh.upstreams["api"].discovery_status
    assert state.errors == 0


@pytest.mark.anyio
async def test_ttl_expiry_removes_a_silent_instance(registry, consul_mesh, watcher):
    registered = time.monotonic()
    talker = register(registry, "api", 7001, ttl="400ms")
    register(registry, "api", 7002, ttl="400ms")  # never heartbeats
    async with consul_mesh(registry.url):
        await watcher.until("api", lambda snap: ports(snap) == {7001, 7002})

        async def heartbeat() -> None:
            while True:
                await anyio.to_thread.run_sync(registry.catalog.update_check, f"service:{talker}", "passing")
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            snap = await watcher.until("api", lambda snap: ports(snap) == {7001}, timeout=3)
            gone_after = time.monotonic() - registered
            tg.cancel_scope.cancel()
    assert 0.39 < gone_after < 2.0  # not before its TTL, and soon after it
    assert ports(snap) == {7001}
    assert registry.catalog.agent_checks()["service:api-7002"]["Output"].startswith("TTL expired")


@pytest.mark.anyio
async def test_tags_warning_and_datacenter_options(registry, consul_mesh, watcher):
    register(registry, "api", 7101, Tags=["blue"], ttl="30s")
    register(registry, "api", 7102, Tags=["green"], ttl="30s",
             Weights={"Passing": 5, "Warning": 2})
    registry.catalog.update_check("service:api-7102", "warning")
    async with consul_mesh(registry.url, tags=["blue"]):
        await watcher.until("api", lambda snap: ports(snap) == {7101})
    async with consul_mesh(registry.url, include_warning=True, datacenter="dc1"):
        snap = await watcher.until("api", lambda snap: ports(snap) == {7101, 7102})
        assert {ep.port: ep.weight for ep in snap} == {7101: 1, 7102: 2}
        registry.catalog.update_check("service:api-7102", "passing")
        snap = await watcher.until("api", lambda snap: {ep.weight for ep in snap} == {1, 5})


@pytest.mark.anyio
async def test_service_name_setting_and_unknown_datacenter_is_an_error(registry, consul_mesh, watcher):
    register(registry, "orders-v2", 7201, ttl="30s")
    async with consul_mesh(registry.url, service="orders-v2") as mesh:
        await watcher.until("api", lambda snap: ports(snap) == {7201})
    async with consul_mesh(registry.url, datacenter="mars", backoff=0.01) as mesh:
        status = mesh.upstreams["api"].discovery_status
        with anyio.fail_after(5):
            while status.errors < 2:
                await anyio.sleep(0.01)
    assert "No path to datacenter" in status.last_error


@pytest.mark.anyio
async def test_registry_restart_keeps_traffic_flowing_and_registrations_come_back(
    tmp_path, upstream, consul_mesh, watcher
):
    data = tmp_path / "reg"
    servers = [upstream(f"api-{i}") for i in range(2)]
    registry = Registry(port=0, data_dir=data).start()
    port = registry.port
    try:
        for s in servers:
            register(registry, "api", s.port, ttl="30s")
        async with consul_mesh(registry.url, backoff=0.02, max_backoff=0.1) as mesh:
            await watcher.until("api", lambda snap: len(snap) == 2)
            status = mesh.upstreams["api"].discovery_status
            async with mesh.client() as client:
                await anyio.to_thread.run_sync(registry.stop)
                with anyio.fail_after(5):
                    while status.errors == 0:
                        await anyio.sleep(0.01)
                # registry down: requests keep flowing on the last snapshot
                for _ in range(4):
                    assert (await client.get("http://api/")).status_code == 200
                assert status.state == "stale" and len(mesh.upstreams["api"].snapshot) == 2
                registry = Registry(port=port, data_dir=data).start()
                assert len(registry.catalog.services) == 2  # persisted
                third = upstream("api-2")
                register(registry, "api", third.port, ttl="30s")
                snap = await watcher.until("api", lambda snap: len(snap) == 3)
                assert ports(snap) == {s.port for s in servers} | {third.port}
                assert status.state == "ok"
                assert (await client.get("http://api/")).status_code == 200
    finally:
        registry.stop()


@pytest.mark.anyio
async def test_index_going_backwards_resets_instead_of_blocking(tmp_path, consul_mesh, watcher):
    """A registry that lost its data restarts at a low index; a client that kept blocking on
    its old, higher index would not see anything until `wait` ran out (60 s here)."""
    registry = Registry(port=0).start()  # in memory
    port = registry.port
    try:
        for p in range(7300, 7310):  # push the index up
            register(registry, "api", p, ttl="30s")
        async with consul_mesh(registry.url, backoff=0.02, max_backoff=0.1, wait="60s"):
            await watcher.until("api", lambda snap: len(snap) == 10)
            await anyio.to_thread.run_sync(registry.stop)
            registry = Registry(port=port).start()
            register(registry, "api", 7399, ttl="30s")
            assert registry.catalog.index_for("api") < 10
            await watcher.until("api", lambda snap: ports(snap) == {7399}, timeout=5)
    finally:
        registry.stop()


@pytest.mark.anyio
async def test_mesh_state_shows_discovery_errors_without_crashing(consul_mesh):
    from meshcore.testing import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    async with consul_mesh(url, backoff=0.01, max_backoff=0.02,
                           extra={"mesh": {"discovery_timeout": 0.2}}) as mesh:
        status = mesh.upstreams["api"].discovery_status
        with anyio.fail_after(5):
            while status.errors < 3:
                await anyio.sleep(0.01)
        state = mesh.state()["services"]["api"]
        async with mesh.client() as client:
            with pytest.raises(meshcore.MeshError):
                await client.get("http://api/")
    assert "ConnectError" in (status.last_error or "")
    assert state  # present in mesh.state()
