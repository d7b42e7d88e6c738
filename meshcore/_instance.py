"""`Instance`: who the local instance is, as a registry needs to know it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Instance"]


@dataclass(frozen=True)
class Instance:
    """The local instance a registering plugin registers (the `meshcore_register` hook).

    `name` is the service it serves; `address` and `port` are where other instances reach it
    (the sidecar's advertised inbound listener); `id` is unique per instance and config
    generation, so a reload can register the new generation before the old one deregisters.
    """

    name: str
    address: str
    port: int
    id: str
