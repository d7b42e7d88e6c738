"""Registration: every registering plugin learns who this instance is (`meshcore_register`).

The sidecar knows what a registry needs and a plugin cannot: the service name
(`[sidecar] service`), where other sidecars connect (the advertised inbound address, bound
only once the listener is up) and the config generation, which goes into the instance id so a
reload registers the new generation before the old one deregisters. Which plugins register
(consul today, etcd next) is theirs to say: the core names none.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .._instance import Instance
from ._settings import Address, advertised

__all__ = ["admin_address", "local_instance", "registered"]


def local_instance(
    settings: Any, inbound: Address, generation: int, admin: Address | None = None
) -> Instance | None:
    """The instance to register, or None when `[sidecar] service` is not set."""
    if not settings.service:
        return None
    address = advertised(settings, inbound)
    metadata: dict[str, str] = {}
    published = admin_address(address, admin)
    if published:
        metadata["admin"] = published
    return Instance(
        name=settings.service,
        address=address.host,
        port=address.port,
        id=f"{settings.service}-{address.host}-{address.port}-g{generation}",
        metadata=metadata,
    )


def admin_address(advertised: Address, admin: Address | None) -> str:
    """The admin address peers' dashboards can reach, or "" when there is none: a loopback
    admin listener is reachable only from this machine, so it is published only when the
    advertised address is loopback too (several sidecars on one host); an admin listener bound
    to every address is reached at the advertised host."""
    if admin is None or admin.path or not admin.port:
        return ""
    if admin.loopback and not advertised.loopback:
        return ""
    host = advertised.host if admin.host in ("0.0.0.0", "::", "") else admin.host
    return str(Address(host, admin.port))


@contextlib.asynccontextmanager
async def registered(mesh: Any, instance: Instance | None) -> AsyncIterator[int]:
    """Registered with every plugin that answers, while inside; yields how many did."""
    async with contextlib.AsyncExitStack() as stack:
        registrations = mesh.plugins.register(instance, mesh) if instance is not None else []
        for registration in registrations:
            await stack.enter_async_context(registration)
        yield len(registrations)
