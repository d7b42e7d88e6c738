"""`[etcd-registration]` against a real 3-member cluster: the key on a lease, seen by
discovery; revoked on shutdown (gone from the snapshot at once); a crashed instance leaves
within its TTL; a lease lost behind the plugin's back is replaced within one keepalive
interval; the local health is reflected in the key."""

from __future__ import annotations

import json
from typing import Any

import anyio
import meshcore_etcd
import pytest
from etcd_testkit import Admin, EtcdCluster

import meshcore
from meshcore.testing.conformance.discovery import RecordingSink

pytestmark = pytest.mark.anyio


def section(etcd: EtcdCluster, admin: Admin, **extra: Any) -> dict[str, Any]:
    return {"etcd-registration": {"endpoints": etcd.urls, "prefix": admin.prefix, "name": "orders",
                                  "address": "127.0.0.1", "port": 8123, "timeout": "0.5s", **extra}}


def discovery(etcd: EtcdCluster, admin: Admin) -> meshcore_etcd.EtcdDiscovery:
    cluster = meshcore_etcd.ClusterConfig(endpoints=tuple(etcd.urls), timeout=0.5)
    options = meshcore_etcd.WatchOptions(cluster, prefix=admin.prefix, probe_interval=0.3, probe_timeout=0.3)
    return meshcore_etcd.EtcdDiscovery(options, "orders")


async def until(predicate: Any, timeout: float, what: str = "condition") -> float:
    """Poll `predicate` until true (bounded); the seconds it took."""
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.01)
    return anyio.current_time() - start


class Health:
    """An inline plugin answering `meshcore_local_health` with whatever the test sets."""

    def __init__(self) -> None:
        self.status = "passing"

    @meshcore.hookimpl
    def meshcore_local_health(self, mesh: Any) -> tuple[str, str]:
        return self.status, "set by the test"


async def test_registered_seen_by_discovery_and_revoked_on_shutdown(etcd, admin, mesh_factory):
    sink = RecordingSink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery(etcd, admin).watch, sink)
        await sink.wait_for(lambda: bool(sink.published), 5, "the empty first answer")
        config = section(etcd, admin, ttl="3s", zone="a", tags=["v1"], meta={"version": "2"}, weight=2)
        async with mesh_factory(config, plugins=["etcd"]) as mesh:
            reg = meshcore_etcd.registration_of(mesh)
            assert reg.status == "registered" and reg.id == "orders-127.0.0.1-8123"
            await sink.wait_for(lambda: bool(sink.last), 2, "the registered instance")
            [ep] = sink.last
            assert (ep.address, ep.port, ep.weight, ep.zone, ep.tags, ep.meta) == (
                "127.0.0.1", 8123, 2, "a", ("v1",), {"version": "2"})
            value = json.loads((await admin.contents())[admin.key("orders", reg.id)])
            assert value["Addr"] == "127.0.0.1:8123"  # what gRPC-Go's resolver reads
            state = mesh.state()["state"]["etcd-registration"]
            assert (state["status"], state["registrations"], state["errors"]) == ("registered", 1, 0)
            published = len(sink.published)
        left = anyio.current_time()
        await sink.wait_for(lambda: sink.last == (), 1, "the revoked instance leaving")
        assert anyio.current_time() - left <= 0.1  # revoke -> DELETE event -> snapshot
        assert len(sink.published) == published + 1
        assert reg.status == "deregistered"
        tg.cancel_scope.cancel()


async def test_crashed_instance_leaves_within_its_ttl(etcd, admin, mesh_factory):
    async with mesh_factory(section(etcd, admin, ttl="2s"), plugins=["etcd"]) as mesh:
        reg = meshcore_etcd.registration_of(mesh)
        assert reg.status == "registered"
        # The "crash": keepalives stop and nothing is revoked on the way out.
        reg._scope.cancel()
        reg.lease = None
    key = admin.key("orders", reg.id)
    assert key in await admin.contents()

    async def gone() -> bool:
        return key not in await admin.contents()

    # The 2 s TTL (counted from the last keepalive, plus etcd's 500 ms expiry check) ends the
    # key: the bound is a hang guard below the default 10 s TTL, not a measurement.
    await until(gone, 8, "the lease expiring")


async def test_lease_revoked_behind_its_back_is_replaced_within_one_keepalive(
    etcd, admin, mesh_factory, monkeypatch
):
    async with mesh_factory(section(etcd, admin, ttl="3s"), plugins=["etcd"]) as mesh:
        reg = meshcore_etcd.registration_of(mesh)
        first = reg.lease
        # Counted in rounds, not seconds: the round that registered again is the one under way
        # at the revoke (0) or the first one after it (1).
        rounds, revoked = 0, False
        registered_in: list[int] = []
        tick = reg.tick

        async def counted() -> None:
            nonlocal rounds
            n = 0
            if revoked:
                rounds += 1
                n = rounds
            await tick()
            if reg.registrations == 2 and not registered_in:
                registered_in.append(n)

        monkeypatch.setattr(reg, "tick", counted)
        await admin.revoke(first)  # as etcd 3.4 does to every lease after a leader stall
        revoked = True
        key = admin.key("orders", reg.id)
        assert key not in await admin.contents()

        async def back() -> bool:  # the key is back and the round that put it there is over
            return bool(registered_in) and key in await admin.contents()

        await until(back, 10 * reg.interval)
        assert registered_in[0] <= 1  # the next keepalive notices and re-registers
        assert reg.lease != first and reg.status == "registered"
        state = mesh.state()["state"]["etcd-registration"]
        assert state["reregistrations"] == 1 and "registering again" in state["last_error"]
        # a late put on the revoked lease is refused (why shutdown revokes instead of deleting)
        with pytest.raises(AssertionError, match="lease not found"):
            await admin.put(key, {"Addr": "127.0.0.1:1"}, lease=first)


async def test_local_health_is_reflected_in_the_key(etcd, admin, mesh_factory):
    health = Health()
    config = section(etcd, admin, ttl="1.5s")
    async with mesh_factory(config, plugins=["etcd"], extra_plugins=[("health", health)]) as mesh:
        reg = meshcore_etcd.registration_of(mesh)
        key = admin.key("orders", reg.id)

        async def shows(status: str | None) -> bool:
            value = (await admin.contents()).get(key)
            if value is None:
                return status is None
            return json.loads(value)["Metadata"]["health"] == status

        assert await shows("passing")
        health.status = "warning"
        await until(lambda: shows("warning"), 3 * reg.interval)
        health.status = "critical"  # the key goes, the lease stays

        async def removed() -> bool:  # etcd drops the key before the plugin has its answer
            return await shows(None) and reg.status == "critical"

        await until(removed, 3 * reg.interval)
        assert reg.lease is not None
        health.status = "passing"

        async def registered_again() -> bool:  # the key is back and the plugin has seen it land
            return await shows("passing") and reg.status == "registered"

        await until(registered_again, 3 * reg.interval)
        assert reg.registrations == 1


async def test_cluster_down_at_start_is_not_fatal(admin, mesh_factory):
    from meshcore.testing import free_port

    config = {"etcd-registration": {"endpoints": [f"127.0.0.1:{free_port()}"], "name": "orders",
                                    "port": 8123, "timeout": "0.2s", "ttl": "1s"}}
    async with mesh_factory(config, plugins=["etcd"]) as mesh:
        reg = meshcore_etcd.registration_of(mesh)
        assert reg.status == "unreachable" and reg.errors >= 1 and reg.lease is None
        assert "initial registration" in reg.last_error


async def test_no_name_no_registration_and_name_needs_port(mesh_factory):
    async with mesh_factory({}, plugins=["etcd"]) as mesh:
        assert meshcore_etcd.registration_of(mesh) is None
        assert mesh.state()["state"] == {}
    mesh = mesh_factory({"etcd-registration": {"name": "orders"}}, plugins=["etcd"])
    with pytest.raises(meshcore.ConfigError, match="etcd-registration.port"):
        async with mesh:
            pass


async def test_a_start_cut_short_still_revokes_its_lease(etcd, admin):
    """A SIGTERM while the sidecar starts can cut the registration's start after its key is in
    etcd (seen in CI: the key outlived the sidecar); `__aexit__` does not run then, so the
    start itself revokes the lease on its way out."""

    class Cut(BaseException):
        pass

    class CutStart:  # the task group the start is cut short in
        async def start(self, *_: Any) -> None:
            raise Cut

    reg = meshcore_etcd.Registration(
        meshcore_etcd.ClusterConfig(endpoints=tuple(etcd.urls), timeout=0.5),
        name="orders", port=8123, address="127.0.0.1", prefix=admin.prefix, task_group=CutStart(),
    )
    with pytest.raises(Cut):
        await reg.__aenter__()
    assert reg.status == "deregistered" and reg.lease is None
    assert not [k for k in await admin.contents() if "/orders/" in k]
