"""Registration goes through the `meshcore_register` hook: any registering plugin answers it.

A throwaway registering plugin, written inline as a third party would, shows the contract
(what it gets, when it is entered and exited, across a reload); the consul plugin shows a real
registry getting the sidecar's instance.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

import meshcore
from meshcore._sidecar._runtime import Sidecar

from .conftest import LOOPBACK, sidecar_config

pytestmark = pytest.mark.anyio


class Recorder:
    """A registering plugin that keeps a log instead of a registry."""

    def __init__(self) -> None:
        self.log: list[tuple[str, meshcore.Instance]] = []

    @meshcore.hookimpl
    def meshcore_register(self, instance: meshcore.Instance, mesh: meshcore.Mesh) -> Any:
        return self._registered(instance)

    @contextlib.asynccontextmanager
    async def _registered(self, instance: meshcore.Instance) -> AsyncIterator[None]:
        self.log.append(("register", instance))
        try:
            yield
        finally:
            self.log.append(("deregister", instance))


class Declines:
    @meshcore.hookimpl
    def meshcore_register(self, instance: meshcore.Instance, mesh: meshcore.Mesh) -> Any:
        return None


async def test_a_registering_plugin_gets_the_instance_and_a_reload_overlaps_generations():
    recorder = Recorder()
    config = sidecar_config({}, service="orders", drain=1)
    plugins = [("recorder", recorder), ("declines", Declines())]
    async with Sidecar(config, [], extra_plugins=plugins) as sidecar:
        inbound = sidecar.addresses["inbound"]
        # Both on loopback, so the admin address is reachable by the peers and is published.
        published = {"admin": str(sidecar.addresses["admin"])}
        first = meshcore.Instance(
            "orders", "127.0.0.1", inbound.port, f"orders-127.0.0.1-{inbound.port}-g1", published
        )
        assert recorder.log == [("register", first)]
        assert sidecar.registration == {
            "name": "orders", "address": "127.0.0.1", "port": inbound.port, "id": first.id
        }
        assert await sidecar.reload(config) is None
        second = meshcore.Instance("orders", "127.0.0.1", inbound.port, first.id[:-1] + "2", published)
        with anyio.fail_after(5):
            while len(recorder.log) < 3:
                await anyio.sleep(0.005)
        # The new generation registers before the old one deregisters: never missing.
        assert recorder.log == [("register", first), ("register", second), ("deregister", first)]
    assert recorder.log[-1] == ("deregister", second)


async def test_advertise_is_the_registered_address_and_no_service_registers_nothing():
    recorder = Recorder()
    config = sidecar_config({}, service="orders", advertise="10.1.2.3:7000")
    async with Sidecar(config, [], extra_plugins=[("recorder", recorder)]):
        # A loopback admin listener is not reachable at 10.1.2.3: no `admin` is published.
        assert recorder.log == [("register", meshcore.Instance("orders", "10.1.2.3", 7000, "orders-10.1.2.3-7000-g1"))]
    recorder = Recorder()
    async with Sidecar(sidecar_config({}), [], extra_plugins=[("recorder", recorder)]) as sidecar:
        assert sidecar.registration is None
    assert recorder.log == []


async def test_a_registration_that_returns_an_awaitable_is_refused():
    class Async:
        @meshcore.hookimpl
        def meshcore_register(self, instance: Any, mesh: Any) -> Any:
            async def register() -> None:
                pass

            return register()

    with pytest.raises(meshcore.PluginError, match="meshcore_register returned an awaitable"):
        async with Sidecar(sidecar_config({}, service="orders"), [], extra_plugins=[("async", Async())]):
            pass


async def test_consul_registers_the_sidecars_instance():
    pytest.importorskip("meshcore_consul")
    from meshcore_consul import Registry

    async with Registry("127.0.0.1", 0, data_dir=None) as registry:
        config = {
            "sidecar": {**LOOPBACK, "service": "orders", "app_health_interval": 0},
            "consul-registration": {
                "agent": registry.url, "ttl": "10s", "token": registry.token, "meta": {"team": "shop"},
            },
        }
        async with Sidecar(config, ["consul"]) as sidecar, httpx.AsyncClient() as client:
            port = sidecar.addresses["inbound"].port
            found = (await client.get(f"{registry.url}/v1/health/service/orders?passing")).json()
            assert [(e["Service"]["ID"], e["Service"]["Address"], e["Service"]["Port"]) for e in found] == [
                (f"orders-127.0.0.1-{port}-g1", "127.0.0.1", port)
            ]
            # The configured meta and the sidecar's admin address, for peers' dashboards.
            assert found[0]["Service"]["Meta"] == {"team": "shop", "admin": str(sidecar.addresses["admin"])}
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{registry.url}/v1/health/service/orders")).json() == []


async def test_consul_leaves_an_explicit_registration_to_its_section():
    pytest.importorskip("meshcore_consul")
    from meshcore_consul import Registry

    async with Registry("127.0.0.1", 0, data_dir=None) as registry:
        config = {
            "sidecar": {**LOOPBACK, "service": "orders", "app_health_interval": 0},
            "consul-registration": {
                "agent": registry.url, "name": "billing", "port": 9000, "id": "b-1", "token": registry.token,
            },
        }
        async with Sidecar(config, ["consul"]), httpx.AsyncClient() as client:
            assert (await client.get(f"{registry.url}/v1/health/service/orders")).json() == []
            found = (await client.get(f"{registry.url}/v1/health/service/billing")).json()
            assert [e["Service"]["ID"] for e in found] == ["b-1"]


async def test_a_dashboard_finds_its_peers_in_discovery():
    """The topology's peers come from the registry: `orders`' sidecar registers with its admin
    address, and `web`'s sidecar, discovering `orders` through consul, fetches that peer's view."""
    pytest.importorskip("meshcore_consul")
    from meshcore_consul import Registry

    async with Registry("127.0.0.1", 0, data_dir=None) as registry:
        server = {
            "sidecar": {**LOOPBACK, "service": "orders", "app_health_interval": 0},
            "consul-registration": {"agent": registry.url, "ttl": "10s", "token": registry.token},
        }
        client_side = {
            "sidecar": LOOPBACK,
            "services": {"orders": {"discovery": "consul", "consul": {"address": registry.url, "token": registry.token}}},
        }
        async with Sidecar(server, ["consul"]) as orders, Sidecar(client_side, ["consul"]) as web:
            admin = str(orders.addresses["admin"])
            async with httpx.AsyncClient(base_url=f"http://{web.addresses['admin']}") as client:
                with anyio.fail_after(10):
                    while True:
                        view = (await client.get("/dashboard.json")).json()
                        peers = {p["address"]: p for p in view["peers"]}
                        if admin in peers:
                            break
                        await anyio.sleep(0.05)
            assert peers[admin]["source"] == "discovery"
            assert peers[admin]["state"] == "up"


def test_the_admin_address_is_published_only_where_peers_can_reach_it():
    from meshcore._sidecar._registration import admin_address
    from meshcore._sidecar._settings import Address

    assert admin_address(Address("127.0.0.1", 7000), Address("127.0.0.1", 9901)) == "127.0.0.1:9901"
    assert admin_address(Address("10.0.0.5", 7000), Address("127.0.0.1", 9901)) == ""
    assert admin_address(Address("10.0.0.5", 7000), Address("0.0.0.0", 9901)) == "10.0.0.5:9901"
    assert admin_address(Address("10.0.0.5", 7000), Address("10.0.0.5", 9901)) == "10.0.0.5:9901"
    assert admin_address(Address("127.0.0.1", 7000), Address("", 0, "/run/admin.sock")) == ""
    assert admin_address(Address("127.0.0.1", 7000), None) == ""
