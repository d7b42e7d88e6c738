"""The sidecar process: three listeners around one running config generation; drain, reload.

The rooms: `_listeners` (bind, accept, connections), `_generation` (a loaded config and its
mesh), `_handlers` (the one request handler factory, outbound and inbound), `_answers` (the
codes the sidecar answers itself), `_accounting` (requests in flight), `_registration`
(`meshcore_register`), `_health` (the local app's health), `_metrics` and `_admin`. The
`Sidecar` here owns them and the process's lifecycle.

A config that does not load or start on reload (SIGHUP) is refused with the error and the old
generation keeps serving.

Drain (SIGTERM), in order: /ready turns 503, the accept loops stop and close their sockets
(new connections are refused by the kernel), idle keep-alive connections are closed, busy
ones get `Connection: close` on their response and close after it; when no request is in
flight, or `drain` seconds passed, what remains is cancelled, the mesh stops (plugin
lifespans and registrations exit: deregistration) and the process exits 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterable, Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from .._config import MeshConfig
from .._errors import ConfigError
from .._http import ServerLimits, serve_connection
from .._http._server import ConnectionInfo
from .._http._socket import Socket
from .._mesh import Mesh
from ._accounting import InFlight
from ._admin import admin_handler
from ._generation import LISTENER_KEYS, Generation, build_mesh
from ._handlers import Direction, Inbound, Outbound, make_handler
from ._health import AppHealth
from ._history import History
from ._listeners import Connection, Listeners
from ._metrics import REJECTED, UNKNOWN, Telemetry
from ._registration import local_instance
from ._settings import Address, advertised, server_limits

if TYPE_CHECKING:
    from ._dashboard import Peers
    from ._workers import WorkerRole  # made by `--workers N` only (`_run`)

__all__ = ["STOP_SIGNALS", "Sidecar"]

# The signals that drain and stop a sidecar; SIGHUP reloads.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logging.getLogger("meshcore.sidecar")


class Sidecar:
    """`meshcore run`: use as `async with Sidecar(config) as sidecar: await sidecar.serve()`.

    `config` is a MeshConfig (or dict); `plugins` overrides its plugin list like `--plugin`;
    `config_path` is what SIGHUP reloads. Listener ports may be 0 (tests): `addresses` has the
    bound ones once started.
    """

    def __init__(
        self,
        config: MeshConfig | dict[str, Any],
        plugins: Sequence[str] | None = None,
        *,
        config_path: str | None = None,
        extra_plugins: Sequence[tuple[str, Any]] = (),
        worker: WorkerRole | None = None,
    ) -> None:
        self.worker = worker  # one of `meshcore run --workers N` (docs/sidecar.md, "Workers")
        self.telemetry = Telemetry()
        self.plugins = list(plugins) if plugins else None
        self.config_path = config_path
        self.history = History()  # widths from the config below, before the first tick
        self.extra_plugins = [
            ("sidecar-telemetry", self.telemetry),
            ("sidecar-history", self.history),
            ("sidecar-app-health", AppHealth()),
            *extra_plugins,
        ]
        self._number = 0
        self._pending: Mesh | None = self._build(config)  # bad config fails before any I/O
        self.settings = self._pending.config.section("sidecar")
        self.history.width = self.settings.dashboard_bucket
        self.history.points = self.settings.dashboard_points
        self.limits: ServerLimits = server_limits(self.settings)
        self._check_admin(self.settings, self._pending.config.source)
        self._check_outbound(self.settings, self._pending.config.source)
        self.generation: Generation | None = None
        self.listeners = Listeners(self.telemetry)
        self.requests = InFlight()
        self.draining = False
        self.stopped: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._directions: dict[str, Direction] = {"outbound": Outbound(), "inbound": Inbound(self)}
        self._rejecters = {name: functools.partial(self._head_rejected, name) for name in self._directions}
        self._handlers = {name: make_handler(self, d) for name, d in self._directions.items()}

    @property
    def addresses(self) -> dict[str, Address]:
        return self.listeners.addresses

    @property
    def connections(self) -> dict[str, set[Connection]]:
        return self.listeners.connections

    @property
    def in_flight(self) -> int:
        """Requests being answered right now (every generation)."""
        return self.requests.count

    @property
    def registration(self) -> dict[str, Any] | None:
        """The instance this sidecar registers (None when `[sidecar] service` is not set)."""
        gen = self.generation
        if gen is None or gen.instance is None:
            return None
        i = gen.instance
        return {"name": i.name, "address": i.address, "port": i.port, "id": i.id}

    # -- config -------------------------------------------------------------------------------

    def _build(self, config: MeshConfig | dict[str, Any]) -> Mesh:
        if not isinstance(config, MeshConfig):
            config = MeshConfig.from_dict(config, source="<dict>")
        return build_mesh(config, self.plugins, self.extra_plugins)

    def _generation(self, mesh: Mesh) -> Generation:
        self._number += 1
        settings = mesh.config.section("sidecar")
        # A worker's own admin listener is private: peers reach the group's (configured) one.
        admin = self.settings.admin if self.settings.admin.port else self.addresses.get("admin")
        instance = local_instance(settings, self.addresses["inbound"], self._number, admin)
        if self.worker is not None and not self.worker.registers:
            instance = None  # the group registers once, through its first worker
        return Generation(self._number, mesh, instance)

    @staticmethod
    def _check_admin(settings: Any, source: str) -> None:
        if not settings.admin.loopback and not settings.admin_bind_any:
            raise ConfigError(
                f"admin listener on {settings.admin}, which is not loopback; the admin API is "
                "unauthenticated, so set `admin_bind_any = true` to allow it",
                source=source,
                path="sidecar.admin",
            )

    @staticmethod
    def _check_outbound(settings: Any, source: str) -> None:
        if settings.outbound_uids and not settings.outbound.path:
            raise ConfigError(
                f"outbound_uids needs a UNIX-socket outbound listener (outbound = "
                f'"unix:/path"), got {settings.outbound}: the peer user of a TCP connection '
                "is not known to the kernel's SO_PEERCRED",
                source=source,
                path="sidecar.outbound_uids",
            )

    def _check_plaintext(self, gen: Generation) -> None:
        """Warn (log and /state `warnings`) when the inbound listener takes plain HTTP from
        beyond this host: anyone who reaches the address reaches the app, unauthenticated."""
        inbound = self.addresses.get("inbound", gen.settings.inbound)
        gen.warnings = []
        if not inbound.loopback and gen.mesh.plugins.server_tls(gen.mesh) is None:
            text = (
                f"inbound listener on {inbound} (not loopback) without TLS: anyone who reaches "
                "it reaches the app unauthenticated; enable the tls plugin or bind to loopback"
            )
            gen.warnings.append(text)
            log.warning("%s", text)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Sidecar:
        self.stopped = anyio.Event()
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)
            mesh, self._pending = self._pending, None
            assert mesh is not None, "a Sidecar runs once"
            stack.push_async_callback(self.listeners.close)
            worker = self.worker
            await self.listeners.bind(
                self.settings, mesh.config.source,
                reuse_port=worker is not None, overrides=worker.overrides if worker else None,
            )
            self.generation = self._generation(mesh)
            await self._tg.start(self.generation.run, name="generation:1")
            self._check_plaintext(self.generation)
            stack.push_async_callback(self._stop_generation)
            self.listeners.peer_uids = frozenset(self.settings.outbound_uids)
            self.listeners.start(
                self._tg, self._serve, self.settings.max_connections,
                self.settings.max_pending_connections,
            )
            self._tg.start_soon(self._sample_history, name="dashboard:history")
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        log.info(
            "sidecar up: outbound %s, inbound %s, admin %s, app %s, services: %s",
            self.addresses["outbound"], self.addresses["inbound"], self.addresses["admin"],
            self.settings.app, ", ".join(self.generation.mesh.upstreams) or "none",
        )
        return self

    async def __aexit__(self, *exc_info: Any) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        try:
            if not self.draining:
                await self.drain(0)
        except BaseException:
            # Cancelled from the task group (a task crashed): hand it to the stack, whose task
            # group absorbs it and raises the real error.
            if await stack.__aexit__(*sys.exc_info()):
                return True
            raise
        return bool(await stack.__aexit__(*exc_info))

    async def _stop_generation(self) -> None:
        gen = self.generation
        if gen is not None:
            await gen.stop()

    @property
    def advertise(self) -> Address:
        """Where other instances reach this one's inbound listener."""
        return advertised(self.settings, self.addresses.get("inbound", self.settings.inbound))

    @functools.cached_property
    def peers(self) -> Peers:
        """The dashboard's cache of its peers' views, made with the first /dashboard.json:
        the dashboard's module loads then, not at start (a sidecar need never serve it)."""
        from ._dashboard import Peers

        return Peers()

    @property
    def ready(self) -> bool:
        gen = self.generation
        return not self.draining and gen is not None and gen.ready

    async def serve(self, signals: AsyncIterable[int] | None = None) -> None:
        """Run until SIGTERM/SIGINT (drain, then return) handling SIGHUP as a reload.

        `signals`: where the signal numbers come from when the caller listened before the
        start (`meshcore run` does, so a SIGTERM during the start ends it cleanly).
        """
        if signals is None:
            with anyio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as received:
                await self.serve(received)
            return
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
                continue
            log.info("%s: draining (deadline %.1f s)", signal.Signals(signum).name, self.settings.drain)
            await self.drain()
            return

    async def _sample_history(self) -> None:
        """The dashboard's time series: one point per `dashboard_bucket` from the counters."""
        history = self.history
        history.started = anyio.current_time()
        while True:
            await anyio.sleep(history.width)
            gen = self.generation
            services = gen.mesh.state().get("services", {}) if gen is not None else {}
            history.tick(self.telemetry, services, anyio.current_time())

    # -- connections --------------------------------------------------------------------------

    def _serve(
        self, conn: Connection, stream: Any, io: Socket | None, info: ConnectionInfo | None
    ) -> Awaitable[None]:
        """The engine's coroutine for one connection, returned rather than awaited here: every
        resumption passes through each frame of the connection's await chain (about 1 µs per
        frame per resumption, docs/data-path.md)."""
        direction = self._directions.get(conn.listener)
        ssl_context = None
        if direction is None:
            handler = admin_handler(self)
        else:
            # One handler per listener, not per connection (its closures cost an idle
            # connection ~2.3 KiB): it finds the connection's state in `info.context`.
            handler = self._handlers[conn.listener]
            if info is None:
                info = ConnectionInfo.from_stream(stream)
            if info.context is not conn:
                info = dataclasses.replace(info, context=conn)
            if conn.listener == "inbound":
                gen = self.generation
                ssl_context = gen.mesh.plugins.server_tls(gen.mesh) if gen else None
        # Over mTLS the engine runs the handshake (on the socket it drives directly).
        return serve_connection(
            stream, handler, limits=self.limits, tls=ssl_context,
            on_tls_error=self._handshake_failed,
            on_reject=None if direction is None else self._rejecters[conn.listener],
            io=io, info=info, on_head=conn.spoke if conn.pending is not None else None,
        )

    def _head_rejected(self, listener: str, info: ConnectionInfo, status: int, message: str) -> None:
        """The engine answered a request itself before the handler saw it (a malformed or
        over-limit head): counted like the sidecar's own answers, by reason. The outbound
        request named no service yet; the inbound listener serves one."""
        gen = self.generation
        service = gen.service if listener == "inbound" and gen is not None else UNKNOWN
        self.telemetry.local_error(listener, service, REJECTED.get(status, "bad_request"))

    def _handshake_failed(self, info: ConnectionInfo, exc: BaseException) -> None:
        client = info.client[0] if isinstance(info.client, tuple) else info.client
        log.info("inbound TLS handshake from %s failed: %r", client, exc)
        self.telemetry.local_error("inbound", "tls", "handshake_failed")

    # -- drain --------------------------------------------------------------------------------

    async def drain(self, deadline: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to `deadline` s), close the rest."""
        if deadline is None:
            deadline = self.settings.drain
        self.draining = True
        await self.listeners.stop_accepting()
        self.listeners.close_idle()
        with anyio.move_on_after(deadline) as scope:
            await self.requests.wait_quiet()
        if scope.cancelled_caught:
            log.warning("drain deadline (%.1f s) passed with %d requests in flight", deadline, self.requests.count)
        else:
            log.info("drained: no requests in flight")
        # Cancelled connections run their cleanup before the mesh goes away.
        await self.listeners.cancel_proxying()
        self.listeners.close_admin()
        if self.stopped is not None:
            self.stopped.set()

    # -- reload -------------------------------------------------------------------------------

    async def reload(self, config: MeshConfig | dict[str, Any] | None = None) -> str | None:
        """Load and start a new config; None on success, else the reason it was refused."""
        try:
            if config is None:
                if self.config_path is None:
                    raise ConfigError("no config file to reload (started from a config object)")
                config = MeshConfig.load(self.config_path)
            mesh = self._build(config)
            settings = mesh.config.section("sidecar")
            for key in LISTENER_KEYS:
                if settings[key] != self.settings[key]:
                    raise ConfigError(
                        f"changed from {self.settings[key]} to {settings[key]}; listener settings "
                        "take effect on restart only",
                        source=mesh.config.source,
                        path=f"sidecar.{key}",
                    )
            self._check_outbound(settings, mesh.config.source)
            gen = self._generation(mesh)
            assert self._tg is not None
            await self._tg.start(gen.run, name=f"generation:{gen.number}")
            self._check_plaintext(gen)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old config
            self.telemetry.reloads["refused"] += 1
            log.error("reload refused, keeping config generation %s: %s",
                      self.generation.number if self.generation else "-", exc)
            return str(exc)
        old, self.generation = self.generation, gen
        self.settings = settings
        self.limits = server_limits(settings)
        self.listeners.peer_uids = frozenset(settings.outbound_uids)
        self.telemetry.reloads["ok"] += 1
        log.info("reloaded: config generation %d, services: %s", gen.number,
                 ", ".join(gen.mesh.upstreams) or "none")
        if old is not None:
            self._tg.start_soon(old.retire, self.settings.drain)
        return None

    # -- state --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        gen = self.generation
        now = time.time()
        return {
            # Wall-clock times (Unix seconds), so a reader can tell how old this answer is
            # and how long the process has run; the ages inside are relative already.
            "time": now,
            "started": self.telemetry.started,
            "uptime": now - self.telemetry.started,
            "generation": gen.number if gen else 0,
            "worker": self.worker.index if self.worker else None,
            "pid": os.getpid(),
            "draining": self.draining,
            "ready": self.ready,
            "in_flight": self.requests.count,
            "service": self.settings.service,
            "app": str(self.settings.app),
            "advertise": str(self.advertise),
            "registration": self.registration,
            "listeners": {name: str(a) for name, a in self.addresses.items()},
            "connections_open": {name: len(c) for name, c in self.connections.items()},
            "warnings": list(gen.warnings) if gen else [],
        }

    def state(self) -> dict[str, Any]:
        gen = self.generation
        state = gen.mesh.state() if gen else {}
        return {**state, "sidecar": {**self.stats(), "telemetry": self.telemetry.as_dict()}}
