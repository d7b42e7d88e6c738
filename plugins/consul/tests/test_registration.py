"""`[consul-registration]`: register on start with a TTL check, heartbeat, re-register when
the registry lost it, deregister on clean shutdown; a crashed instance is reaped."""

from __future__ import annotations

import json

import anyio
import meshcore_consul
import pytest
from meshcore_consul import Registry

import meshcore

pytestmark = pytest.mark.anyio


# Registries that restart in memory are given this token: a restart keeps it.
TOKEN = "test-token"


def section(registry_or_url, **extra):
    """The section for a Registry (with its token) or a bare URL (with TOKEN)."""
    url, token = (registry_or_url, TOKEN) if isinstance(registry_or_url, str) else (
        registry_or_url.url, registry_or_url.token)
    return {"consul-registration": {"agent": url, "name": "orders", "address": "127.0.0.1",
                                    "port": 8123, "token": token, **extra}}


async def until(predicate, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def test_registers_heartbeats_and_deregisters(registry, mesh_factory):
    config = section(registry, ttl="0.6s", tags=["v1"], meta={"zone": "a"},
                     deregister_critical_after="2m")
    async with mesh_factory(config, plugins=["consul"]) as mesh:
        reg = meshcore_consul.registration_of(mesh)
        assert reg.status == "registered" and reg.id == "orders-127.0.0.1-8123"
        [entry] = registry.catalog.health_service("orders", passing=True)
        assert entry["Service"]["Tags"] == ["v1"] and entry["Service"]["Meta"] == {"zone": "a"}
        check = registry.catalog.checks[reg.check_id]
        assert (check.ttl, check.deregister_after) == (0.6, 120.0)
        assert reg.interval == pytest.approx(0.2)
        # three TTLs pass: heartbeats keep it passing
        await anyio.sleep(1.8)
        assert registry.catalog.health_service("orders", passing=True)
        assert reg.heartbeats >= 5 and reg.errors == 0
    assert reg.status == "deregistered"
    assert registry.catalog.services == {}


async def test_registration_status_is_mesh_state(registry, mesh_factory):
    async with mesh_factory(section(registry, ttl="0.3s"), plugins=["consul"]) as mesh:
        reg = meshcore_consul.registration_of(mesh)
        state = mesh.state()["state"]["consul-registration"]
        assert state["id"] == reg.id == "orders-127.0.0.1-8123"
        assert (state["status"], state["registrations"], state["reregistrations"]) == ("registered", 1, 0)
        assert (state["heartbeats"], state["errors"], state["last_error"]) == (0, 0, None)
        assert 0 <= state["last_heartbeat_age"] < 0.1  # the registration itself
        await until(lambda: reg.heartbeats >= 2)
        state = mesh.state()["state"]["consul-registration"]
        assert state["heartbeats"] >= 2 and state["last_heartbeat_age"] < 0.3  # within one TTL
        # The registry loses the instance: the next heartbeat is refused, it registers again.
        await anyio.to_thread.run_sync(registry.catalog.deregister, reg.id)
        await until(lambda: reg.registrations == 2)
        state = json.loads(json.dumps(mesh.state()))["state"]["consul-registration"]
        assert (state["status"], state["reregistrations"], state["errors"]) == ("registered", 1, 1)
        assert "registering again" in state["last_error"]
    assert mesh.state()["state"]["consul-registration"]["status"] == "deregistered"


async def test_no_registration_no_mesh_state(mesh_factory):
    async with mesh_factory({}, plugins=["consul"]) as mesh:
        assert mesh.state()["state"] == {}


async def test_reregisters_when_the_registry_lost_it(mesh_factory):
    first = Registry(port=0, token=TOKEN).start()  # in memory: a restart loses everything
    port = first.port
    try:
        async with mesh_factory(section(first, ttl="0.3s"), plugins=["consul"]) as mesh:
            reg = meshcore_consul.registration_of(mesh)
            await anyio.to_thread.run_sync(first.stop)
            await until(lambda: reg.status == "unreachable")
            first = Registry(port=port, token=TOKEN).start()
            assert first.catalog.services == {}
            await until(lambda: reg.registrations == 2)
            assert reg.status == "registered" and "registering again" in reg.last_error
            assert first.catalog.health_service("orders", passing=True)
    finally:
        first.stop()


async def test_registry_down_at_start_is_not_fatal(mesh_factory):
    from meshcore.testing import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with mesh_factory(section(url, ttl="0.3s", timeout="1s"), plugins=["consul"]) as mesh:
        reg = meshcore_consul.registration_of(mesh)
        assert reg.status == "unreachable" and reg.errors >= 1
        with Registry(port=port, token=TOKEN) as registry:
            await until(lambda: reg.status == "registered")
            assert reg.id in registry.catalog.services


async def test_crashed_instance_goes_critical_then_is_reaped(mesh_factory):
    with Registry(port=0, min_deregister_after=0.3) as registry:
        mesh = mesh_factory(section(registry, ttl="0.2s", deregister_critical_after="1s",
                                    heartbeat_ratio=0.3), plugins=["consul"])
        async with mesh:
            reg = meshcore_consul.registration_of(mesh)
            reg._scope.cancel()  # the "crash": heartbeats stop, no deregistration below
            reg.registrations = 0
            reg._client, client = None, reg._client
            await client.aclose()
        assert reg.id in registry.catalog.services
        await until(lambda: not registry.catalog.health_service("orders", passing=True), timeout=2)
        await until(lambda: reg.id not in registry.catalog.services, timeout=3)


async def test_acl_token_used_for_registration(mesh_factory):
    with Registry(port=0, token="w-token") as registry:
        async with mesh_factory(section(registry, token="w-token"), plugins=["consul"]) as mesh:
            assert meshcore_consul.registration_of(mesh).status == "registered"
        async with mesh_factory(section(registry, token="bad"), plugins=["consul"]) as mesh:
            reg = meshcore_consul.registration_of(mesh)
            assert reg.status == "unreachable" and "ACL not found" in reg.last_error


async def test_no_name_means_no_registration_and_name_needs_port(registry, mesh_factory):
    async with mesh_factory({}, plugins=["consul"]) as mesh:
        assert meshcore_consul.registration_of(mesh) is None
    mesh = mesh_factory({"consul-registration": {"name": "orders"}}, plugins=["consul"])
    with pytest.raises(meshcore.ConfigError, match="consul-registration.port"):
        async with mesh:
            pass


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ({"ttl": "soon"}, "consul-registration.ttl"),
        ({"agent": "ftp://x"}, "consul-registration.agent"),
        ({"meta": {"a": 1}}, "consul-registration.meta"),
        ({"heartbeat_ratio": 2.0}, "consul-registration.heartbeat_ratio"),
        ({"colour": "red"}, "consul-registration.colour"),
    ],
)
def test_bad_settings_fail_at_load_with_the_key_path(mesh_factory, table, path):
    with pytest.raises(meshcore.ConfigError, match=path.replace(".", r"\.")):
        mesh_factory({"consul-registration": {"name": "o", "port": 1, **table}}, plugins=["consul"])


def test_bad_discovery_settings_fail_at_load(mesh_factory):
    config = {"services": {"api": {"discovery": "consul", "consul": {"wait": "20m"}}}}
    with pytest.raises(meshcore.ConfigError, match=r"services\.api\.consul\.wait"):
        mesh_factory(config, plugins=["consul"])


class LocalHealth:
    """An inline plugin standing in for the sidecar's app probe."""

    def __init__(self) -> None:
        self.answer: tuple[str, str] | None = None

    @meshcore.hookimpl
    def meshcore_local_health(self, mesh):
        return self.answer


async def test_heartbeats_report_the_local_health(registry, mesh_factory):
    health = LocalHealth()
    health.answer = ("critical", "app refuses connections")
    config = section(registry, ttl="0.3s")
    async with mesh_factory(config, plugins=["consul"], extra_plugins=[("health", health)]) as mesh:
        reg = meshcore_consul.registration_of(mesh)
        # registered as critical from the start: never in the passing answers
        assert registry.catalog.health_service("orders", passing=True) == []
        check = registry.catalog.checks[reg.check_id]
        assert check.status == "critical"
        health.answer = None  # no opinion: passing
        await until(lambda: registry.catalog.health_service("orders", passing=True))
        health.answer = ("warning", "disk 91% full")
        await until(lambda: registry.catalog.checks[reg.check_id].status == "warning")
        assert registry.catalog.checks[reg.check_id].output == "disk 91% full"
        health.answer = ("critical", "app refuses connections")
        await until(lambda: reg.health_status == "critical")  # the registry has answered
        assert registry.catalog.checks[reg.check_id].status == "critical"
        assert registry.catalog.checks[reg.check_id].output == "app refuses connections"
        assert registry.catalog.health_service("orders", passing=True) == []
        assert mesh.state()["state"]["consul-registration"]["health"] == "critical"
        assert reg.errors == 0


async def test_a_start_cut_short_still_deregisters(registry):
    """A SIGTERM while the sidecar starts can cut the registration's start after the agent has
    the instance; `__aexit__` does not run then, so the start deregisters on its way out."""

    class Cut(BaseException):
        pass

    class CutStart:  # the task group the start is cut short in
        async def start(self, *_: object) -> None:
            raise Cut

    agent = meshcore_consul.AgentConfig(
        address=meshcore_consul.parse_agent_address(registry.url), token=registry.token, timeout=2.0
    )
    reg = meshcore_consul.Registration(agent, name="orders", port=8123, address="127.0.0.1",
                                       task_group=CutStart())
    with pytest.raises(Cut):
        await reg.__aenter__()
    assert reg.status == "deregistered"
    assert registry.catalog.services == {}


async def test_a_registration_cut_before_its_answer_is_deregistered_too(registry):
    """Cut while the register request is in flight: the agent may have applied it, so the
    instance is deregistered even though no answer said it was registered."""
    agent = meshcore_consul.AgentConfig(
        address=meshcore_consul.parse_agent_address(registry.url), token=registry.token, timeout=2.0
    )
    reg = meshcore_consul.Registration(agent, name="orders", port=8123, address="127.0.0.1")
    with anyio.CancelScope() as scope:
        scope.cancel()  # cancelled at the register request's first checkpoint
        await reg.__aenter__()
    assert scope.cancelled_caught
    assert reg.registrations == 0 and reg.status == "deregistered"
    assert registry.catalog.services == {}
