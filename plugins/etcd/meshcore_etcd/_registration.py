"""Registering the local instance as a key on a lease, for as long as the mesh runs.

One lease per process (TTL 10 s, kratos uses 15 s), kept alive every TTL/3 so one lost or slow
keepalive does not expire it; the instance key (`<prefix><name>/<id>`, gRPC-Go's layout) is
put on that lease, so a crashed instance disappears when the lease expires (TTL + etcd's
500 ms expiry check; one TTL more across a leader change, which renews every lease:
etcd-io/etcd#9395).

- A keepalive answered without a TTL, or a put refused with "lease not found", means the lease
  is gone: etcd 3.4 revokes every lease when a stalled leader resumes (etcd-io/etcd#15247,
  seen in 5 of 6 runs on loopback: shared/reference/etcd.md, 3.4). Grant a new one and put the
  key again at once, not at the next tick.
- Local health (`mesh.local_health()`) is written at each tick: warning as
  `"health":"warning"` in the metadata, critical by deleting the key (the lease stays), a
  recovered instance puts it back.
- Shutdown revokes the lease instead of deleting the key: a put that timed out during an
  election can still be applied later, and a late put carrying a revoked lease is refused,
  where a late put after a delete would resurrect the instance.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from ._client import Cluster, ClusterConfig, EtcdAnswerError, EtcdError, b64, describe, int64
from ._keys import encode_instance

__all__ = ["LeaseLost", "Registration"]

log = logging.getLogger("meshcore_etcd.registration")


class LeaseLost(Exception):
    """etcd no longer knows the lease (expired, or revoked behind our back)."""


def _always_passing() -> tuple[str, str]:
    return "passing", ""


class Registration:
    """One instance kept registered under a lease. Use as an async context manager.

    `status` is "starting", "registered", "critical" (key removed while the app is critical),
    "lost" (lease gone, registering again), "unreachable" (no member answers; retrying) or
    "deregistered". `state()` is shown in `mesh.state()["state"]["etcd-registration"]`.
    """

    def __init__(
        self,
        cluster: ClusterConfig,
        *,
        name: str,
        port: int,
        prefix: str = "meshcore/services/",
        id: str = "",
        address: str = "",
        weight: int = 1,
        zone: str = "",
        tags: tuple[str, ...] = (),
        meta: Mapping[str, str] | None = None,
        ttl: float = 10.0,
        keepalive_ratio: float = 1 / 3,
        task_group: Any = None,
        health: Callable[[], tuple[str, str]] = _always_passing,
    ) -> None:
        self.cluster_config = cluster
        self.name = name
        self.port = port
        self.address = address or socket.gethostname()
        self.id = id or f"{name}-{self.address}-{port}"
        self.key = f"{prefix}{name}/{self.id}"
        self.weight = weight
        self.zone = zone
        self.tags = tags
        self.meta = dict(meta or {})
        self.ttl = ttl
        self.interval = ttl * keepalive_ratio
        self.health = health
        self.status = "starting"
        self.lease: str | None = None
        self.written: str | None = None  # the health the key now shows; None: no key
        self.registrations = 0
        self.keepalives = 0
        self.errors = 0
        self.last_error: str | None = None
        self._last_keepalive: float | None = None
        self._task_group = task_group
        self._cluster: Cluster | None = None
        self._scope: anyio.CancelScope | None = None

    @property
    def addr(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def value(self, health: str) -> bytes:
        return encode_instance(self.addr, weight=self.weight, zone=self.zone, tags=self.tags,
                               meta=self.meta, health=health)

    def state(self) -> dict[str, Any]:
        """JSON-ready. `reregistrations`: leases granted after the first (etcd lost one)."""
        last = self._last_keepalive
        return {
            "id": self.id, "key": self.key, "service": self.name, "status": self.status,
            "lease": self.lease, "health": self.written or "critical",
            "registrations": self.registrations,
            "reregistrations": max(0, self.registrations - 1),
            "keepalives": self.keepalives,
            "last_keepalive_age": None if last is None else round(anyio.current_time() - last, 3),
            "errors": self.errors, "last_error": self.last_error,
        }

    def _failed(self, what: str) -> None:
        self.errors += 1
        self.last_error = what
        log.warning("etcd registration %s: %s", self.id, what)

    @property
    def _client(self) -> Cluster:
        if self._cluster is None:
            raise RuntimeError("the registration is not running")
        return self._cluster

    async def register(self) -> None:
        """Grant a new lease and put the key on it (unless the app is critical)."""
        data = await self._client.request("/v3/lease/grant", {"TTL": str(max(1, round(self.ttl)))})
        lease = data.get("ID")
        if not isinstance(lease, (str, int)) or isinstance(lease, bool) or not str(lease).isdigit():
            raise EtcdAnswerError(f"lease/grant: expected an ID, got {lease!r:.60}")
        self.lease = str(lease)
        self.written = None
        self.registrations += 1
        self._last_keepalive = anyio.current_time()
        await self.reflect_health(force=True)

    async def reflect_health(self, *, force: bool = False) -> None:
        """Make the key show the local health: put it (passing/warning) or delete it (critical)."""
        status, _reason = self.health()
        if status == self.written and not force:
            return
        if status == "critical":
            await self._client.request("/v3/kv/deleterange", {"key": b64(self.key)})
            self.written = None
            self.status = "critical"
            return
        try:
            await self._client.request(
                "/v3/kv/put", {"key": b64(self.key), "value": b64(self.value(status)), "lease": self.lease}
            )
        except EtcdError as exc:
            if exc.lease_not_found:
                raise LeaseLost(str(exc)) from None
            raise
        self.written = status
        self.status = "registered"

    async def keepalive(self) -> None:
        """One lease refresh; LeaseLost when etcd answers without a TTL (the lease is gone)."""
        data = await self._client.request("/v3/lease/keepalive", {"ID": self.lease})
        result = data.get("result")
        if not isinstance(result, Mapping):
            raise EtcdAnswerError(f"lease/keepalive: expected {{\"result\": ...}}, got {str(data)[:60]}")
        if int64(result.get("TTL"), "lease/keepalive result.TTL", 0) <= 0:
            raise LeaseLost(f"lease {self.lease} is gone (keepalive answered TTL 0)")
        self.keepalives += 1
        self._last_keepalive = anyio.current_time()

    async def tick(self) -> None:
        """One round: register when there is no lease, else keep it alive and reflect health;
        a lost lease is replaced at once."""
        try:
            if self.lease is None:
                await self.register()
                return
            await self.keepalive()
            await self.reflect_health()
        except LeaseLost as exc:
            self.status = "lost"
            self._failed(f"{exc}; registering again")
            self.lease = None
            try:
                await self.register()
            except Exception as again:  # noqa: BLE001 - retried at the next tick
                self.status = "unreachable"
                self._failed(f"register: {describe(again)}")
        except Exception as exc:  # noqa: BLE001 - survived: retried at the next tick
            if self.status != "critical":
                self.status = "unreachable"
            self._failed(describe(exc))

    async def _run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            while True:
                await anyio.sleep(self.interval)
                await self.tick()

    async def __aenter__(self) -> Registration:
        self._cluster = await Cluster(self.cluster_config).__aenter__()
        try:
            try:
                await self.register()
            except Exception as exc:  # noqa: BLE001 - starting while etcd is down is not fatal
                self.lease = None
                self.status = "unreachable"
                self._failed(f"initial registration: {describe(exc)}")
            if self._task_group is not None:
                await self._task_group.start(self._run)
        except BaseException:
            # A start cut short (a SIGTERM while the sidecar starts): `__aexit__` will not run,
            # so revoke here what was granted; its key may already be in etcd.
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._scope is not None:
            self._scope.cancel()
        cluster = self._cluster
        if cluster is None:
            return
        # Revoke even when the mesh is being cancelled, but never hang shutdown on it.
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.cluster_config.timeout * 2):
            try:
                if self.lease is not None:
                    await cluster.request("/v3/lease/revoke", {"ID": self.lease})
                    self.status = "deregistered"
                    self.lease = None
            except EtcdError as err:
                if err.lease_not_found:
                    self.status = "deregistered"
                else:
                    self._failed(f"revoke: {err}")
            except Exception as err:  # noqa: BLE001 - reported; the lease then expires on its own
                self._failed(f"revoke: {describe(err)}")
            finally:
                self._cluster = None
                await cluster.__aexit__(None, None, None)
