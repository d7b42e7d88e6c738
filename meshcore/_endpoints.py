"""Endpoints, snapshots and per-endpoint live statistics.

An Endpoint is immutable and hashable, so balancers can precompute tables keyed by it and a
snapshot can be compared cheaply. What changes per request (in-flight count, latency EWMA,
consecutive failures, ejection) lives beside it in `EndpointStats`, owned by the Upstream and
shared by balancer and breaker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

__all__ = ["Endpoint", "EndpointStats", "Outcome", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service: where to connect, and what discovery said about it.

    `metadata` is stored as sorted pairs so the endpoint stays hashable; read it with `meta`.
    """

    address: str
    port: int
    weight: int = 1
    zone: str | None = None
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    id: str = ""
    # Endpoints key the connection pools and every per-endpoint table, several lookups per
    # request: hash the fields once, not on every lookup.
    _hash: int = field(init=False, repr=False, compare=False)

    if TYPE_CHECKING:
        # The generated __init__, as callers may use it: __post_init__ turns any iterable of tags
        # and a metadata mapping into the tuples the fields hold.
        def __init__(
            self,
            address: str,
            port: int,
            weight: int = 1,
            zone: str | None = None,
            tags: Iterable[str] = (),
            metadata: Mapping[str, str] | tuple[tuple[str, str], ...] = (),
            id: str = "",
        ) -> None: ...

    def __post_init__(self) -> None:
        if not self.id:
            host = f"[{self.address}]" if ":" in self.address else self.address
            object.__setattr__(self, "id", f"{host}:{self.port}")
        metadata: object = self.metadata  # may still be a mapping here, see __init__
        if isinstance(metadata, Mapping):
            object.__setattr__(self, "metadata", tuple(sorted(metadata.items())))
        tags: object = self.tags
        if not isinstance(tags, tuple):
            object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "_hash", hash(self._fields()))

    def _fields(self) -> tuple[Any, ...]:
        """Every field but the cached hash, in declaration order."""
        return (self.address, self.port, self.weight, self.zone, self.tags, self.metadata, self.id)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle the fields, not the cached hash (string hashes differ between processes).
        return (Endpoint, self._fields())

    @property
    def meta(self) -> dict[str, str]:
        return dict(self.metadata)

    @property
    def authority(self) -> str:
        return self.id if self.id.endswith(f":{self.port}") else f"{self.address}:{self.port}"

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> Endpoint:
        """`host:port` or `[v6]:port` to an Endpoint; raises ValueError naming the form."""
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, sep, port_text = text.rpartition(":")
        if not host or not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f'expected "host:port", got {text!r}')
        return cls(host, int(port_text), **kwargs)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The endpoints of one service at one moment. `version` grows with every change."""

    endpoints: tuple[Endpoint, ...]
    version: int = 0

    def __len__(self) -> int:
        return len(self.endpoints)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.endpoints)

    @classmethod
    def of(cls, endpoints: Iterable[Endpoint], version: int = 0) -> Snapshot:
        return cls(tuple(endpoints), version)


@dataclass(slots=True)
class EndpointStats:
    """Live statistics for one endpoint, shared by the balancer and the breaker.

    `ewma` is a latency estimate in seconds (peak-EWMA style consumers decay it themselves);
    `ejected_until` is an anyio clock time, `-inf` when the endpoint is not ejected.
    """

    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    ewma: float = 0.0
    last_update: float = 0.0
    ejected_until: float = -math.inf
    times_ejected: int = 0

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


class Outcome(NamedTuple):
    """How one request to one endpoint ended, told to balancers, breakers and event hooks.

    `status_code` is None when no whole response came back, in which case `error` says why:
    a body cut short after its head is such an error. It is told when the body ends (at once
    when it came with the head). `elapsed` is seconds from send to response headers (or to the
    error).

    A NamedTuple: immutable like a frozen dataclass, and built at a third of its cost on every
    request (docs/data-path.md, "Figures").
    """

    service: str
    endpoint: Endpoint
    method: str
    status_code: int | None
    error: BaseException | None
    elapsed: float
