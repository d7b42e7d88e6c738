"""The built-in `static` discovery: endpoints listed in the config.

It is registered through the entry-point group like any third-party plugin (see
pyproject.toml), so `meshcore plugins` lists it and it uses only the public hooks.

    [services.orders.static]
    endpoints = ["127.0.0.1:8001", { address = "127.0.0.1:8002", weight = 3, zone = "b" }]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._endpoints import Endpoint
from ._plugins import Kind, hookimpl
from ._settings import Setting

_ENTRY_KEYS = {"address", "weight", "zone", "tags", "metadata", "id"}
_EXPECTED = (
    'expected a list of "host:port" strings or tables '
    "{ address = \"host:port\", weight, zone, tags, metadata, id }"
)


def parse_endpoints(value: Any) -> tuple[Endpoint, ...]:
    """Config entries to Endpoints; raises ValueError naming the entry and what was expected."""
    if not isinstance(value, list):
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    endpoints = []
    for i, item in enumerate(value):
        where = f"entry {i}"
        if isinstance(item, str):
            try:
                endpoints.append(Endpoint.parse(item))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: {_EXPECTED}, got {item!r}")
        unknown = set(item) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_ENTRY_KEYS)}")
        weight = item.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"{where}: weight: expected an integer ≥ 0, got {weight!r}")
        tags = item.get("tags", [])
        metadata = item.get("metadata", {})
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{where}: tags: expected a list of strings, got {tags!r}")
        if not isinstance(metadata, Mapping) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise ValueError(f"{where}: metadata: expected a table of strings, got {metadata!r}")
        try:
            endpoints.append(
                Endpoint.parse(
                    item.get("address", ""),
                    weight=weight,
                    zone=item.get("zone"),
                    tags=tuple(tags),
                    metadata=tuple(sorted(metadata.items())),
                    id=str(item.get("id", "")),
                )
            )
        except ValueError as exc:
            raise ValueError(f"{where}: address: {exc}") from None
    return tuple(endpoints)


class StaticDiscovery:
    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints = endpoints

    async def watch(self, sink: Any) -> None:
        sink.publish(self.endpoints)


@hookimpl
def meshcore_kinds() -> list[Kind]:
    return [
        Kind(
            "static",
            "discovery",
            {
                "endpoints": Setting(
                    "any",
                    [],
                    "the service's endpoints",
                    required=True,
                    convert=parse_endpoints,
                )
            },
            help="endpoints listed in the config",
        )
    ]


@hookimpl
def meshcore_discovery(kind: str, settings: Any, service: str) -> StaticDiscovery | None:
    if kind != "static":
        return None
    return StaticDiscovery(settings.endpoints)
