"""The dns discovery against meshcore's DiscoveryConformance suite, with a real dnsmasq."""

from __future__ import annotations

import pytest
from meshcore_dns import DnsDiscovery

from meshcore.testing.conformance.discovery import DiscoveryConformance, SourceControl

pytestmark = pytest.mark.integration


def make(port: int, name: str = "orders.mesh.test") -> DnsDiscovery:
    return DnsDiscovery(
        "orders", name=name, port=8080, nameservers=[("127.0.0.1", port)],
        timeout=0.2, lifetime=0.4, min_refresh=0.1, max_refresh=0.5, backoff_max=0.3,
    )


class TestDnsConformance(DiscoveryConformance):
    follow_within = 5.0
    plugins = ["dns"]
    kind = "dns"

    @pytest.fixture
    def server(self, dnsmasq):
        dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.21", "127.0.0.22"]})
        return dnsmasq

    @pytest.fixture
    def discovery(self, server):
        return make(server.port)

    @pytest.fixture
    def broken_discovery(self, server):
        return make(server.port, "missing.mesh.test")

    @pytest.fixture
    def source(self, server):
        def restore_changed():
            server.set_hosts({"orders.mesh.test": ["127.0.0.23"]})
            server.start()

        return SourceControl(server.stop, restore_changed)
