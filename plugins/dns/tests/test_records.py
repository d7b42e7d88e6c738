"""SRV priority/weight rules (RFC 2782) and setting validation: pure, no network."""

from __future__ import annotations

import pytest
from meshcore_dns import SrvRecord, srv_endpoints

import meshcore


def rec(priority: int, weight: int, port: int, target: str) -> SrvRecord:
    return SrvRecord(priority, weight, port, target)


def test_lowest_priority_group_with_addresses_wins() -> None:
    records = [rec(20, 1, 80, "c."), rec(10, 3, 80, "a."), rec(10, 1, 81, "b.")]
    eps = srv_endpoints(records, {"a.": ["10.0.0.1"], "b.": ["10.0.0.2"], "c.": ["10.0.0.3"]})
    assert {(e.address, e.port, e.weight) for e in eps} == {("10.0.0.1", 80, 3), ("10.0.0.2", 81, 1)}
    assert all(e.meta["srv.priority"] == "10" for e in eps)


def test_group_without_addresses_falls_to_next_priority() -> None:
    records = [rec(10, 3, 80, "a."), rec(20, 1, 80, "c.")]
    eps = srv_endpoints(records, {"a.": [], "c.": ["10.0.0.3"]})
    assert [(e.address, e.meta["srv.priority"]) for e in eps] == [("10.0.0.3", "20")]
    assert srv_endpoints(records, {}) == ()


def test_weight_zero_is_kept_as_zero() -> None:
    eps = srv_endpoints([rec(1, 0, 80, "a."), rec(1, 5, 80, "b.")], {"a.": ["10.0.0.1"], "b.": ["10.0.0.2"]})
    assert {e.address: e.weight for e in eps} == {"10.0.0.1": 0, "10.0.0.2": 5}


def test_same_address_and_port_merge_with_summed_weight() -> None:
    eps = srv_endpoints([rec(1, 2, 80, "a."), rec(1, 3, 80, "b.")], {"a.": ["10.0.0.1"], "b.": ["10.0.0.1"]})
    assert [(e.address, e.weight) for e in eps] == [("10.0.0.1", 5)]


def test_invalid_records_are_ignored() -> None:
    records = [rec(1, 1, 0, "a."), rec(1, 1, 80, "."), rec(5, 1, 80, "b.")]
    eps = srv_endpoints(records, {"a.": ["10.0.0.1"], "b.": ["10.0.0.2"]})
    assert [e.address for e in eps] == ["10.0.0.2"]


def test_target_with_several_addresses_gives_one_endpoint_each() -> None:
    eps = srv_endpoints([rec(1, 4, 80, "a.")], {"a.": ["10.0.0.2", "::1", "10.0.0.1"]})
    assert sorted(e.address for e in eps) == ["10.0.0.1", "10.0.0.2", "::1"]
    assert {e.weight for e in eps} == {4}
    assert {e.id for e in eps} == {"10.0.0.1:80", "10.0.0.2:80", "[::1]:80"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "", "port": 80}, "expected a DNS name"),
        ({"name": "a..b", "port": 80}, "expected a DNS name"),
        ({"name": "x.test", "type": "MX", "port": 80}, "one of 'A', 'AAAA', 'SRV'"),
        ({"name": "x.test", "port": 70000}, "between 0 and 65535"),
        ({"name": "x.test", "port": 80, "nameservers": ["ns1.example"]}, "not names"),
        ({"name": "x.test", "port": 80, "nameservers": ["127.0.0.1:0"]}, "1..65535"),
        ({"name": "x.test", "port": 80, "nameservers": ["127.0.0.1:x"]}, "optional :port"),
        ({"name": "x.test", "port": 80, "min_refresh": 0}, "≥ 0.05"),
        ({"name": "x.test", "port": 80, "min_refresh": "soon"}, "duration"),
        ({"name": "x.test", "port": 80, "target_types": ["MX"]}, '"A" and "AAAA"'),
        ({"name": "x.test", "port": 80, "nameserver": "127.0.0.1"}, "nameserver"),
        ({"port": 80}, "name"),
    ],
)
def test_bad_settings_fail_at_load_with_key_path(mesh_factory, settings, message) -> None:
    config = {"services": {"orders": {"discovery": "dns", "dns": settings}}}
    with pytest.raises(meshcore.ConfigError) as info:
        mesh_factory(config, plugins=["dns"])
    assert "services.orders.dns" in str(info.value)
    assert message in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "x.test"}, "services.orders.dns.port: type 'A' needs `port`"),
        ({"name": "x.test", "port": 80, "min_refresh": 10, "max_refresh": 1}, "larger than max_refresh"),
    ],
)
async def test_settings_that_depend_on_each_other_fail_at_start(mesh_factory, settings, message) -> None:
    config = {"services": {"orders": {"discovery": "dns", "dns": settings}}}
    mesh = mesh_factory(config, plugins=["dns"])
    with pytest.raises(meshcore.ConfigError, match=message):
        async with mesh:
            pass


def test_refresh_follows_ttl_within_bounds() -> None:
    from meshcore_dns import DnsDiscovery

    d = DnsDiscovery("orders", name="x.test", port=80, min_refresh=5, max_refresh=300)
    assert d.refresh_delay(0) == 5  # TTL 0 is not a busy loop
    assert d.refresh_delay(30) == 30
    assert d.refresh_delay(86400) == 300


def test_failure_backoff_doubles_from_min_refresh_up_to_backoff_max() -> None:
    from meshcore_dns import DnsDiscovery

    d = DnsDiscovery("orders", name="x.test", port=80, min_refresh=1, backoff_max=8)
    for failures, low, high in [(1, 1, 1), (2, 1, 2), (3, 2, 4), (4, 4, 8), (10, 4, 8), (100, 4, 8)]:
        d.consecutive_failures = failures
        delays = [d._backoff() for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high, (failures, min(delays), max(delays))
