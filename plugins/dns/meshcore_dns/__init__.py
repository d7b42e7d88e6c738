"""meshcore-servicemesh-dns: service discovery from DNS A/AAAA and SRV records.

    [services.orders]
    discovery = "dns"
    [services.orders.dns]
    name = "_http._tcp.orders.default.svc.cluster.local"
    type = "SRV"

See docs/dns.md for every setting, the refresh schedule and what each failure does. Besides
the Discovery protocol (`watch`) the discovery has `async resolve_once() -> list[Endpoint]`,
the optional convention `meshcore check-config --resolve` uses to resolve once at startup.
"""

from __future__ import annotations

from typing import Any

import meshcore

from ._discovery import FAILURE_KINDS, DnsDiscovery, DnsError
from ._records import SrvRecord, srv_endpoints

__all__ = ["FAILURE_KINDS", "DnsDiscovery", "DnsError", "SrvRecord", "srv_endpoints"]

_TYPES = ("A", "AAAA", "SRV")


def _check_name(value: str) -> str:
    import dns.exception
    import dns.name

    if not value.strip():
        raise ValueError("expected a DNS name like 'orders.mesh.test' or '_http._tcp.orders.mesh.test', got ''")
    try:
        dns.name.from_text(value)
    except dns.exception.DNSException as exc:
        raise ValueError(f"expected a DNS name, got {value!r}: {exc}") from None
    return value


def _parse_nameservers(value: tuple[str, ...]) -> tuple[tuple[str, int | None], ...]:
    """`"127.0.0.1"`, `"127.0.0.1:5353"`, `"::1"`, `"[::1]:5353"` -> (address, port or None)."""
    import ipaddress

    parsed = []
    for item in value:
        host, port = item, None
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"expected an IP address with an optional :port, got {item!r}")
                port = int(rest[1:])
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
            if not port_text.isdigit():
                raise ValueError(f"expected an IP address with an optional :port, got {item!r}")
            port = int(port_text)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"expected an IP address with an optional :port (nameservers are addresses, not "
                f"names), got {item!r}"
            ) from None
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be 1..65535, got {item!r}")
        parsed.append((host, port))
    return tuple(parsed)


def _check_target_types(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value or any(v not in ("A", "AAAA") for v in value):
        raise ValueError(f'expected a non-empty list of "A" and "AAAA", got {list(value)!r}')
    return tuple(dict.fromkeys(value))


SETTINGS = {
    "name": meshcore.Setting(
        "str", None, "the DNS name: a host name (A/AAAA) or _service._proto.name (SRV)",
        required=True, convert=_check_name,
    ),
    "type": meshcore.Setting("str", "A", "record type to look up", choices=_TYPES),
    "port": meshcore.Setting(
        "int", 0, "the service port for A/AAAA (SRV records carry their own)", min=0, max=65535
    ),
    "nameservers": meshcore.Setting(
        "list[str]", [], 'nameserver addresses ("ip" or "ip:port"); empty: the system resolver',
        convert=_parse_nameservers,
    ),
    "dns_port": meshcore.Setting(
        "int", 53, "port for nameservers given without one", min=1, max=65535
    ),
    # dnspython's own defaults: 2 s per attempt, 5 s for the whole resolution.
    "timeout": meshcore.Setting("duration", 2.0, "per-query timeout", min=0.001),
    "lifetime": meshcore.Setting("duration", 5.0, "total time for one resolution", min=0.001),
    # Envoy's dns_refresh_rate is 5 s (data-plane-anchors.md, "Discovery"): the floor, so TTL 0
    # answers (dnsmasq local records, Consul DNS) refresh every 5 s instead of busy-looping.
    "min_refresh": meshcore.Setting(
        "duration", 5.0, "shortest time between resolutions (TTL 0 answers use this)", min=0.05
    ),
    "max_refresh": meshcore.Setting(
        "duration", 300.0, "longest time between resolutions, whatever the TTL", min=0.05
    ),
    # Envoy's dns_failure_refresh_rate: base = refresh rate, max = 10 x base.
    "backoff_max": meshcore.Setting(
        "duration", 50.0, "longest wait between retries after failures", min=0.05
    ),
    "target_types": meshcore.Setting(
        "list[str]", ["A", "AAAA"], "how SRV targets missing from the Additional section are looked up",
        convert=_check_target_types,
    ),
}


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    return [meshcore.Kind("dns", "discovery", SETTINGS, help="endpoints from DNS A/AAAA or SRV records")]


@meshcore.hookimpl
def meshcore_discovery(kind: str, settings: Any, service: str) -> DnsDiscovery | None:
    if kind != "dns":
        return None
    if settings.type != "SRV" and not settings.port:
        raise meshcore.ConfigError(
            f"type {settings.type!r} needs `port` (the service port; only SRV records carry one)",
            path=f"services.{service}.dns.port",
        )
    if settings.min_refresh > settings.max_refresh:
        raise meshcore.ConfigError(
            f"min_refresh ({settings.min_refresh:g} s) is larger than max_refresh "
            f"({settings.max_refresh:g} s)",
            path=f"services.{service}.dns",
        )
    return DnsDiscovery(
        service,
        name=settings.name,
        type=settings.type,
        port=settings.port,
        nameservers=[(host, port or settings.dns_port) for host, port in settings.nameservers],
        timeout=settings.timeout,
        lifetime=settings.lifetime,
        min_refresh=settings.min_refresh,
        max_refresh=settings.max_refresh,
        backoff_max=settings.backoff_max,
        target_types=settings.target_types,
    )
