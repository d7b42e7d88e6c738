"""From DNS records to meshcore endpoints: pure functions, no I/O.

SRV semantics follow RFC 2782 ("Usage rules"): a client must try the lowest priority first, and
within one priority spread load by weight, where weight 0 entries get "a very small chance"
when others have weight > 0 and an equal chance when all are 0. In a mesh the *balancer* does
the per-request choice, so discovery publishes only the lowest-priority group that has
endpoints with addresses, and carries each record's weight as the endpoint weight. The
`weighted` balancer reads weight 0 as "never, unless every endpoint has weight 0", which is
RFC 2782's intent (weight-0 records are a last resort) without the random sliver of traffic.

A single SRV record whose target is "." means "the service is decidedly not available at this
domain" (RFC 2782): that is an answer, not a failure, so it publishes an empty set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import meshcore

__all__ = ["SrvRecord", "address_endpoints", "srv_endpoints"]


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # absolute, with the trailing dot, as dnspython prints it

    @property
    def valid(self) -> bool:
        """Port 0 cannot be connected to, and "." is "no service" (RFC 2782)."""
        return 0 < self.port < 65536 and self.target not in (".", "")


def is_unavailable(records: Sequence[SrvRecord]) -> bool:
    """RFC 2782: exactly one record, target "." -> the service is not available here."""
    return len(records) == 1 and records[0].target == "."


def address_endpoints(name: str, addresses: Iterable[str], port: int) -> tuple[meshcore.Endpoint, ...]:
    """A/AAAA mode: one endpoint per address, sorted so the set is stable across answers."""
    return tuple(
        meshcore.Endpoint(address, port, metadata={"dns.name": name})
        for address in sorted(set(addresses))
    )


def srv_endpoints(
    records: Sequence[SrvRecord], addresses: Mapping[str, Sequence[str]]
) -> tuple[meshcore.Endpoint, ...]:
    """The endpoints of the lowest priority group that has any target with an address.

    `addresses` maps a target name to its addresses (missing or empty: the target did not
    resolve, so the group below it is tried). A target with several addresses gives one
    endpoint per address, each with the record's weight. Two records naming the same
    address and port are one endpoint whose weight is their sum, which is what a client
    following RFC 2782 would send there.
    """
    for priority in sorted({r.priority for r in records if r.valid}):
        merged: dict[tuple[str, int], list[SrvRecord]] = {}
        for record in records:
            if record.priority != priority or not record.valid:
                continue
            for address in addresses.get(record.target, ()):
                merged.setdefault((address, record.port), []).append(record)
        if not merged:
            continue
        endpoints = []
        for (address, port), group in sorted(merged.items()):
            first = group[0]
            endpoints.append(
                meshcore.Endpoint(
                    address,
                    port,
                    weight=sum(r.weight for r in group),
                    metadata={
                        "dns.target": first.target,
                        "srv.priority": str(priority),
                        "srv.weight": str(sum(r.weight for r in group)),
                    },
                )
            )
        return tuple(endpoints)
    return ()
