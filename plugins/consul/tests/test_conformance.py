"""The consul discovery against meshcore's DiscoveryConformance suite, with the embedded
registry as the real source: publishes, survives an unreachable agent, follows a registry
restart that comes back with other instances, and cancels cleanly mid blocking query."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from consul_testkit import register
from meshcore_consul import AgentConfig, ConsulDiscovery, Registry
from meshcore_consul._agent import parse_agent_address

from meshcore.testing import free_port
from meshcore.testing.conformance.discovery import DiscoveryConformance, SourceControl


def make(url: str) -> ConsulDiscovery:
    # A short backoff so recovery is quick; `wait` stays at its default (60 s), so the
    # cancellation test really cancels a query blocked in the registry.
    agent = AgentConfig(parse_agent_address(url), timeout=1.0)
    return ConsulDiscovery(agent, "orders", backoff=0.02, max_backoff=0.2)


class RestartableRegistry:
    """An in-memory registry that can go away and come back on the same port with other
    instances registered (a restart without its data, as far as clients can tell)."""

    def __init__(self) -> None:
        self.registry = self._with(Registry(port=0, data_dir=None), [7001, 7002]).start()
        self.url = self.registry.url

    @staticmethod
    def _with(registry: Registry, ports: list[int]) -> Registry:
        for port in ports:
            register(registry, "orders", port)  # straight into the catalog: no empty window
        return registry

    async def stop(self) -> None:
        await anyio.to_thread.run_sync(self.registry.stop)

    async def restart_changed(self) -> None:
        port = self.registry.port
        self.registry = self._with(Registry(port=port, data_dir=None), [7003])
        await anyio.to_thread.run_sync(self.registry.start)

    def close(self) -> None:
        self.registry.stop()


class TestConsulConformance(DiscoveryConformance):
    plugins = ["consul"]
    kind = "consul"

    @pytest.fixture
    def source_registry(self) -> Iterator[RestartableRegistry]:
        source = RestartableRegistry()
        yield source
        source.close()

    @pytest.fixture
    def discovery(self, source_registry: RestartableRegistry) -> ConsulDiscovery:
        return make(source_registry.url)

    @pytest.fixture
    def broken_discovery(self) -> ConsulDiscovery:
        return make(f"http://127.0.0.1:{free_port()}")  # nothing listens there

    @pytest.fixture
    def source(self, source_registry: RestartableRegistry) -> SourceControl:
        return SourceControl(source_registry.stop, source_registry.restart_changed)
