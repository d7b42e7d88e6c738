"""`Instance`: who the local instance is, as a registry needs to know it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Instance"]


@dataclass(frozen=True)
class Instance:
    """The local instance a registering plugin registers (the `meshcore_register` hook).

    `name` is the service it serves; `address` and `port` are where other instances reach it
    (the sidecar's advertised inbound listener); `id` is unique per instance and config
    generation, so a reload can register the new generation before the old one deregisters.
    `metadata` is what the instance publishes beside its address (the sidecar's `admin`
    address, so peers' dashboards find it in discovery); a registering plugin merges it under
    its own configured meta, which wins.
    """

    name: str
    address: str
    port: int
    id: str
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
