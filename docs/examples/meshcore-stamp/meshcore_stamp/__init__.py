"""meshcore-stamp: a complete example plugin (see docs/writing-a-plugin.md).

It provides one layer kind, `stamp`, that adds a header to every request of a service and
counts responses by status class, and shows those counts in `mesh.state()`.

    [mesh]
    plugins = ["stamp"]

    [services.orders]
    resilience = ["stamp"]
    [services.orders.stamp]
    header = "x-caller"
    value = "checkout"
"""

from __future__ import annotations

from collections import Counter

import meshcore


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    return [
        meshcore.Kind(
            "stamp",
            "layer",
            {
                "header": meshcore.Setting("str", "x-mesh-stamp", "header to add"),
                "value": meshcore.Setting("str", "meshcore", "its value"),
            },
            help="adds a header to every request and counts responses",
        )
    ]


@meshcore.hookimpl
def meshcore_layer(
    kind: str, settings: meshcore.Settings, upstream: meshcore.Upstream
) -> meshcore.Layer | None:
    if kind != "stamp":
        return None  # not ours: another plugin answers for it
    header = settings.header.encode("latin-1")
    value = settings.value.encode("latin-1")
    counts: Counter[str] = Counter()
    upstream.add_state("stamp", lambda: dict(counts))

    def layer(inner: meshcore.Service) -> meshcore.Service:
        async def service(request: meshcore.Request) -> meshcore.Response:
            request.headers.append((header, value))
            response = await inner(request)
            counts[f"{response.status_code // 100}xx"] += 1
            return response

        return service

    return layer
