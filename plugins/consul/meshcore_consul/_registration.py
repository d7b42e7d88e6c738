"""Registering the local service instance with a TTL check, for as long as the mesh runs.

The instance registers itself (`PUT /v1/agent/service/register`) with one TTL check and
`DeregisterCriticalServiceAfter`, then marks the check passing every `ttl * heartbeat_ratio`.
A ratio of 1/3 leaves two spare heartbeats per TTL, so one lost or slow heartbeat does not turn
the instance critical (Spring Cloud Consul's heartbeat uses 2/3, one spare). When a heartbeat
is refused, the registry lost the registration (restarted without data, reaped it): register
again at once. On a clean shutdown the instance deregisters; after a crash the TTL runs out,
the check turns critical (the instance leaves `?passing` answers within one TTL) and the
registry reaps it after `deregister_critical_after` (Consul's minimum is 1 minute).

Each heartbeat reports the instance's own health (`mesh.local_health()`, which the sidecar
feeds by probing its app): `check/pass`, `check/warn` or `check/fail` with the reason as the
note, so an instance whose app died leaves `?passing` answers at the next heartbeat instead of
being heartbeated as passing until callers' breakers find out.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import anyio

from ._agent import AgentClient, AgentConfig, AgentResponse, AgentUnreachable, error_text
from ._duration import format_duration

__all__ = ["Registration"]

# Consul's TTL endpoints per check status (PUT /v1/agent/check/{pass,warn,fail}/:check_id).
_TTL_PATH = {"passing": "pass", "warning": "warn", "critical": "fail"}


def _always_passing() -> tuple[str, str]:
    return "passing", ""

log = logging.getLogger("meshcore_consul.registration")


class Registration:
    """One service instance kept registered. Use as an async context manager.

    `status` is "starting", "registered", "lost" (heartbeat refused, re-registering),
    "unreachable" (agent down; retrying) or "deregistered". `state()` is what the plugin
    shows in `mesh.state()["state"]["consul-registration"]`.
    """

    def __init__(
        self,
        agent: AgentConfig,
        *,
        name: str,
        port: int,
        id: str = "",
        address: str = "",
        tags: tuple[str, ...] = (),
        meta: dict[str, str] | None = None,
        weight_passing: int = 1,
        weight_warning: int = 1,
        ttl: float = 10.0,
        heartbeat_ratio: float = 1 / 3,
        deregister_critical_after: float = 60.0,
        task_group: Any = None,
        health: Callable[[], tuple[str, str]] = _always_passing,
    ) -> None:
        self.agent = agent
        self.name = name
        self.port = port
        self.address = address
        self.id = id or f"{name}-{address or socket.gethostname()}-{port}"
        self.tags = tags
        self.meta = dict(meta or {})
        self.weights = {"Passing": weight_passing, "Warning": weight_warning}
        self.ttl = ttl
        self.interval = ttl * heartbeat_ratio
        self.deregister_critical_after = deregister_critical_after
        self.check_id = f"service:{self.id}"
        self.status = "starting"
        self.registrations = 0
        self.heartbeats = 0
        self.errors = 0
        self.last_error: str | None = None
        self._last_passing: float | None = None  # anyio clock: last register or TTL pass
        self._task_group = task_group
        self.health = health
        self.health_status = "passing"
        self._client: AgentClient | None = None
        self._scope: anyio.CancelScope | None = None
        self._sent = False  # a registration was sent (answered or not)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ID": self.id,
            "Name": self.name,
            "Tags": list(self.tags),
            "Port": self.port,
            "Meta": self.meta,
            "Weights": self.weights,
            "Check": {
                "CheckID": self.check_id,
                "Name": f"Service '{self.name}' TTL (meshcore)",
                "TTL": format_duration(self.ttl),
                "Status": self.health()[0],
                "DeregisterCriticalServiceAfter": format_duration(self.deregister_critical_after),
            },
        }
        if self.address:
            body["Address"] = self.address
        return body

    def state(self) -> dict[str, Any]:
        """JSON-ready. `last_heartbeat_age`: seconds since the registry last accepted this
        instance as passing (registration or TTL pass), None before it ever did;
        `reregistrations`: registrations after the first (the registry had lost it)."""
        last = self._last_passing
        return {
            "id": self.id, "service": self.name, "status": self.status,
            "registrations": self.registrations,
            "reregistrations": max(0, self.registrations - 1),
            "heartbeats": self.heartbeats,
            "health": self.health_status,
            "last_heartbeat_age": None if last is None else round(anyio.current_time() - last, 3),
            "errors": self.errors, "last_error": self.last_error,
        }

    async def _put(self, path: str, *, params: list[tuple[str, str]] | None = None, body: Any = None) -> AgentResponse:
        assert self._client is not None
        return await self._client.put(path, params=params or (), body=body)

    def _failed(self, what: str) -> None:
        self.errors += 1
        self.last_error = what
        log.warning("consul registration %s: %s", self.id, what)

    async def register(self) -> None:
        body = self.body()
        self._sent = True
        response = await self._put("/v1/agent/service/register", body=body)
        if response.status_code != 200:
            raise RuntimeError(f"register {self.id}: {error_text(response)}")
        self.registrations += 1
        self.status = "registered"
        self.health_status = body["Check"]["Status"]
        if self.health_status == "passing":
            self._last_passing = anyio.current_time()

    async def heartbeat(self) -> None:
        """One TTL update with the local health; re-registers when the registry no longer
        knows the check."""
        status, note = self.health()
        try:
            response = await self._put(
                f"/v1/agent/check/{_TTL_PATH[status]}/{self.check_id}",
                params=[("note", note)] if note else None,
            )
        except AgentUnreachable as exc:
            self.status = "unreachable"
            self._failed(f"heartbeat: {type(exc).__name__}: {exc}")
            return
        if response.status_code == 200:
            self.heartbeats += 1
            self.health_status = status
            if status == "passing":
                self._last_passing = anyio.current_time()
            if self.status != "registered":
                self.status = "registered"
            return
        # Consul answers 404/500 `Unknown check` (or `does not have associated TTL` on older
        # versions) when it lost the check; any refusal is worth one re-registration.
        self.status = "lost"
        self._failed(f"heartbeat refused ({error_text(response)}); registering again")
        try:
            await self.register()
        except (AgentUnreachable, RuntimeError) as exc:
            self._failed(str(exc))

    async def _run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            while True:
                await anyio.sleep(self.interval)
                if self.registrations == 0:
                    try:
                        await self.register()
                    except (AgentUnreachable, RuntimeError) as exc:
                        self.status = "unreachable"
                        self._failed(str(exc))
                    continue
                await self.heartbeat()

    async def __aenter__(self) -> Registration:
        self._client = self.agent.client()
        try:
            try:
                await self.register()
            except (AgentUnreachable, RuntimeError) as exc:
                # Starting while the registry is down is not fatal: the mesh can still call
                # out, and the heartbeat loop registers as soon as the agent answers.
                self.status = "unreachable"
                self._failed(f"initial registration: {exc}")
            if self._task_group is not None:
                await self._task_group.start(self._run)
        except BaseException:
            # A start cut short (a SIGTERM while the sidecar starts): `__aexit__` will not run,
            # so deregister here; the agent may have the instance even if its answer was cut.
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._scope is not None:
            self._scope.cancel()
        client, self._client = self._client, None
        if client is None:
            return
        # Deregister even when the mesh is being cancelled, but never hang shutdown on it.
        with anyio.CancelScope(shield=True), anyio.move_on_after(min(self.agent.timeout, 5.0)):
            try:
                if self.registrations or self._sent:  # sent: its answer may have been cut
                    self._client = client
                    response = await self._put(f"/v1/agent/service/deregister/{self.id}")
                    if response.status_code in (200, 404):
                        self.status = "deregistered"
                    else:
                        self._failed(f"deregister: {error_text(response)}")
            except AgentUnreachable as err:
                self._failed(f"deregister: {type(err).__name__}: {err}")
            finally:
                self._client = None
                await client.aclose()
