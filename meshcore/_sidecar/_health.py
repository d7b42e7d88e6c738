"""The local app's health, probed by the sidecar and reported to registration.

A sidecar that keeps heartbeating a registration after its app died sends callers to a dead
instance until their breakers eject it. So the sidecar probes the app (a TCP connect, or an
HTTP GET of `app_health_path` expecting 2xx/3xx) every `app_health_interval`, and answers the
`meshcore_local_health` hook with the result: a registering plugin (consul's TTL heartbeat)
then marks the instance critical and it leaves `?passing` answers. After
`app_unhealthy_after` failed probes in a row it is critical, so one slow probe does not pull
the instance (Kubernetes' readiness probe uses 3 failures of 10 s periods; a mesh wants
faster: 2 × 5 s by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio

from .._endpoints import Endpoint
from .._models import Request
from .._plugins import hookimpl

__all__ = ["AppHealth"]


class AppHealth:
    """An inline plugin of one sidecar mesh: a lifespan task probing the app, and its verdict."""

    def __init__(self) -> None:
        self.status = "passing"
        self.reason = ""
        self.failures = 0
        self.probes = 0

    @hookimpl
    def meshcore_local_health(self, mesh: Any) -> tuple[str, str]:
        return self.status, self.reason

    @hookimpl
    def meshcore_lifespan(self, mesh: Any) -> Any:
        settings = mesh.config.section("sidecar")
        if not settings.app_health_interval:
            return None
        return self._probing(mesh, settings)

    @contextlib.asynccontextmanager
    async def _probing(self, mesh: Any, settings: Any) -> AsyncIterator[None]:
        from .._http import HTTPConnector, Timeouts

        app = Endpoint(settings.app.host, settings.app.port)
        timeouts = Timeouts(connect=settings.app_health_timeout, read=settings.app_health_timeout)
        async with HTTPConnector(timeouts=timeouts) as connector:
            # The first verdict is in before other lifespans register the instance.
            await self.probe(connector, app, settings)
            mesh.add_state("app-health", self.state)

            async def loop() -> None:
                while True:
                    await anyio.sleep(settings.app_health_interval)
                    await self.probe(connector, app, settings)

            mesh.task_group.start_soon(loop, name="sidecar app health")
            yield

    async def probe(self, connector: Any, app: Endpoint, settings: Any) -> None:
        self.probes += 1
        error = await _check(connector, app, settings)
        if error is None:
            self.failures = 0
            self.status, self.reason = "passing", ""
            return
        self.failures += 1
        if self.failures >= settings.app_unhealthy_after:
            self.status = "critical"
            self.reason = f"local app {app.id}: {error} ({self.failures} probes in a row)"

    def state(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "failures_in_a_row": self.failures,
            "probes": self.probes,
        }


async def _check(connector: Any, app: Endpoint, settings: Any) -> str | None:
    """None when the app is healthy, else what is wrong, in a few words."""
    try:
        with anyio.fail_after(settings.app_health_timeout):
            if not settings.app_health_path:
                stream = await anyio.connect_tcp(app.address, app.port)
                await stream.aclose()
                return None
            request = Request("GET", f"http://{app.authority}{settings.app_health_path}")
            response = await connector.send(app, request)
            await response.aread()
    except TimeoutError:
        return f"no answer within {settings.app_health_timeout:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the app's verdict
        return f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 400:
        return None
    return f"{settings.app_health_path} answered {response.status_code}"
