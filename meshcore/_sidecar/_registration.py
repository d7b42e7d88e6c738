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

__all__ = ["local_instance", "registered"]


def local_instance(settings: Any, inbound: Address, generation: int) -> Instance | None:
    """The instance to register, or None when `[sidecar] service` is not set."""
    if not settings.service:
        return None
    address = advertised(settings, inbound)
    return Instance(
        name=settings.service,
        address=address.host,
        port=address.port,
        id=f"{settings.service}-{address.host}-{address.port}-g{generation}",
    )


@contextlib.asynccontextmanager
async def registered(mesh: Any, instance: Instance | None) -> AsyncIterator[int]:
    """Registered with every plugin that answers, while inside; yields how many did."""
    async with contextlib.AsyncExitStack() as stack:
        registrations = mesh.plugins.register(instance, mesh) if instance is not None else []
        for registration in registrations:
            await stack.enter_async_context(registration)
        yield len(registrations)
