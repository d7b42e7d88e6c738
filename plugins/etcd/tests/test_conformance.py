"""The etcd discovery against meshcore's DiscoveryConformance suite, with the real 3-member
cluster as the source: publishes, survives an unreachable cluster, follows the whole cluster
going down and coming back with other instances, and cancels cleanly mid-watch."""

from __future__ import annotations

import anyio
import pytest
from etcd_testkit import Admin, EtcdCluster
from meshcore_etcd import ClusterConfig, EtcdDiscovery, WatchOptions

from meshcore.testing import free_port
from meshcore.testing.conformance.discovery import DiscoveryConformance, SourceControl


def make(endpoints: list[str], prefix: str) -> EtcdDiscovery:
    options = WatchOptions(ClusterConfig(endpoints=tuple(endpoints), timeout=0.5), prefix=prefix,
                           probe_interval=0.3, probe_timeout=0.3, backoff=0.02, max_backoff=0.2)
    return EtcdDiscovery(options, "orders")


class TestEtcdConformance(DiscoveryConformance):
    kind = "etcd"
    plugins = ["etcd"]

    @pytest.fixture
    async def discovery(self, etcd: EtcdCluster, admin: Admin) -> EtcdDiscovery:
        await admin.put_instance("orders", 7001)
        await admin.put_instance("orders", 7002)
        return make(etcd.urls, admin.prefix)

    @pytest.fixture
    def broken_discovery(self) -> EtcdDiscovery:
        return make([f"127.0.0.1:{free_port()}"], "nowhere/")  # nothing listens there

    @pytest.fixture
    def source(self, etcd: EtcdCluster, admin: Admin) -> SourceControl:
        def down() -> None:
            for i in range(len(etcd.members)):
                etcd.kill(i)

        async def back_changed() -> None:
            await anyio.to_thread.run_sync(etcd.heal)
            await admin.put_instance("orders", 7003)

        return SourceControl(down, back_changed)
