"""The sidecar process: three listeners around one running Mesh, drain and reload.

Shape. A `Generation` is one loaded config: a running `Mesh` (built with meshcore's own
HTTP/1.1 connector, never httpx) plus the connector to the local app. The `Sidecar` owns the
listeners, which outlive generations: a SIGHUP reload builds and starts a new generation,
switches new requests to it, and retires the old one once its in-flight requests finished
(or the drain deadline passed), so a reload drops no connection. A config that does not load
or start is refused with the error and the old generation keeps serving.

Drain (SIGTERM), in order: /ready turns 503, the accept loops stop and close their sockets
(new connections are refused by the kernel), idle keep-alive connections are closed, busy
ones get `Connection: close` on their response and close after it; when no request is in
flight, or `drain` seconds passed, what remains is cancelled, the mesh stops (plugin
lifespans exit: deregistration) and the process exits 0.

Every connection is tracked (`connections_open` in /metrics and /state) so tests can see that
bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from .._config import MeshConfig
from .._endpoints import Endpoint
from .._errors import ConfigError
from .._http import (
    BufferedBody,
    ConnectionInfo,
    HTTPConnector,
    PoolLimits,
    ServerLimits,
    Timeouts,
    serve_connection,
)
from .._http._server import RequestRejected
from .._mesh import Mesh
from .._models import Headers, Request, Response
from .._upstream import loop_clock
from ._admin import admin_handler
from ._health import AppHealth
from ._metrics import Telemetry
from ._proxy import classify, peer_identity, request_headers, response_headers
from ._settings import Address, advertised, server_limits

__all__ = ["Generation", "Sidecar"]

log = logging.getLogger("meshcore.sidecar")
_now = anyio.current_time
# Responses up to this size are read whole before being written (see `Sidecar._finish`);
# the same threshold the engine's client uses to glue a request body to its head.
_GLUE = 16384
# Settings that need new sockets: a reload that changes them is refused.
# Sections of discovery plugins that register the local instance (name, port, address, id).
_REGISTRATION_SECTIONS = ("consul-registration",)
_LISTENER_KEYS = ("outbound", "inbound", "admin", "admin_bind_any", "max_connections")


# Keep every pooled connection idle-able: with the engine's default of 20 idle per endpoint,
# 32 concurrent clients on one endpoint closed and reopened 12 connections per round
# (measured: 164 -> 112 µs of CPU per proxied request on trio with this change).
# Idle ones still expire after PoolLimits.idle_expiry (60 s).
_POOL = PoolLimits(max_connections=100, max_idle=100)


def sidecar_connector(mesh: Mesh, service: str, ssl_context: Any) -> HTTPConnector:
    """The mesh's per-service sender: meshcore's HTTP/1.1 pools, with peer checks over TLS."""

    def verify_peer(endpoint: Endpoint, peer: Any) -> None:
        mesh.plugins.check_peer(service, endpoint, peer, mesh)

    return HTTPConnector(
        limits=_POOL,
        ssl_context=ssl_context,
        verify_peer=verify_peer if ssl_context is not None else None,
    )


class Generation:
    """One loaded config: its mesh, the app connector, and how many requests use it."""

    def __init__(self, number: int, mesh: Mesh) -> None:
        self.number = number
        self.mesh = mesh
        self.settings = mesh.config.section("sidecar")
        self.in_flight = 0
        self.idle = anyio.Event()
        s = self.settings
        self.app = Endpoint(s.app.host, s.app.port)
        self.app_connector = HTTPConnector(
            limits=_POOL,
            timeouts=Timeouts(connect=s.app_connect_timeout, read=s.app_read_timeout)
        )
        self.authorize = mesh.plugins.implements("meshcore_authorize")
        self.service = s.service or "local"
        self.retired = anyio.Event()
        self.stopped = anyio.Event()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the mesh until `retire()`; a task of its own, because trio wants a mesh's task
        group entered and exited by the same task, and a reload retires it from another."""
        try:
            async with self.mesh, self.app_connector:
                task_status.started()
                await self.retired.wait()
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self.retired.set()
        with anyio.CancelScope(shield=True):
            await self.stopped.wait()

    @property
    def ready(self) -> bool:
        return all(up.discovery_status.state != "waiting" for up in self.mesh.upstreams.values())


class Connection:
    """One accepted client connection."""

    __slots__ = ("listener", "scope", "busy", "done", "identity", "client_ip")

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self.scope = anyio.CancelScope()
        self.busy = False
        self.done: Callable[[], None] | None = None
        self.identity: bytes | None = None
        self.client_ip = b""


class _Tracked:
    """A response body that tells the sidecar when the response is over.

    Iterating hands out the wrapped body's own iterator, so there is no per-chunk overhead;
    the engine closes the body when the response is written (or the client went away).
    """

    __slots__ = ("body", "done")

    def __init__(self, body: Any, done: Callable[[], None]) -> None:
        self.body = body
        self.done = done

    def __aiter__(self) -> Any:
        body = self.body
        if isinstance(body, bytes):
            return _once(body)
        return body.__aiter__()

    async def aclose(self) -> None:
        try:
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            done, self.done = self.done, None
            if done is not None:
                done()


async def _once(body: bytes) -> Any:
    yield body


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
    ) -> None:
        self.telemetry = Telemetry()
        self.plugins = list(plugins) if plugins else None
        self.config_path = config_path
        self.extra_plugins = list(extra_plugins)
        self._number = 0
        self.registration: dict[str, Any] | None = None
        self._pending = self._build(config)  # validate now: bad config fails before any I/O
        self.settings = self._pending.config.section("sidecar")
        self.limits: ServerLimits = server_limits(self.settings)
        self.generation: Generation | None = None
        self.addresses: dict[str, Address] = {}
        self.connections: dict[str, set[Connection]] = {"outbound": set(), "inbound": set(), "admin": set()}
        self.in_flight = 0
        self.draining = False
        self.stopped: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._accepting: dict[str, anyio.CancelScope] = {}
        self._listeners: dict[str, Any] = {}
        self._quiet: anyio.Event | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._check_admin(self.settings, self._pending.config.source)

    # -- config -------------------------------------------------------------------------------

    def _build(self, config: MeshConfig | dict[str, Any], inbound: Address | None = None) -> Mesh:
        """A mesh for `config`; with the bound `inbound` address, registration filled in."""
        if not isinstance(config, MeshConfig):
            config = MeshConfig.from_dict(config, source="<dict>")
        self._raw = config
        extra = [
            ("sidecar-telemetry", self.telemetry),
            ("sidecar-app-health", AppHealth()),
            *self.extra_plugins,
        ]
        mesh = Mesh(config, self.plugins, extra_plugins=extra, connector_factory=sidecar_connector)
        if inbound is None:
            return mesh
        registered = self._registration(config, mesh, inbound)
        if registered is None:
            return mesh
        return Mesh(registered, self.plugins, extra_plugins=extra, connector_factory=sidecar_connector)

    def _registration(self, config: MeshConfig, mesh: Mesh, inbound: Address) -> MeshConfig | None:
        """Tell a registering discovery plugin who this instance is.

        A plugin that registers the local instance declares a section with `name`, `port`,
        `address` and `id` settings (consul's `[consul-registration]`). When `[sidecar] service`
        is set and that section leaves `name` empty, the sidecar fills it in: the service name,
        and the advertised inbound address, because that is where other sidecars must connect.
        The instance id carries the config generation: a reload registers the new generation
        before the old one deregisters itself, so the instance is never missing in between.
        """
        settings = mesh.config.section("sidecar")
        if not settings.service:
            return None
        address = advertised(settings, inbound)
        sections = dict(config.sections)
        changed = False
        for name in _REGISTRATION_SECTIONS:
            kind = mesh.plugins.kinds.get(name)
            if kind is None or kind.family != "section":
                continue
            table = dict(sections.get(name, {}))
            if table.get("name"):
                continue  # the user registers explicitly
            table["name"] = settings.service
            table.setdefault("port", address.port)
            table.setdefault("address", address.host)
            table.setdefault("id", f"{settings.service}-{address.host}-{address.port}-g{self._number + 1}")
            sections[name] = table
            self.registration = {"section": name, **{k: table[k] for k in ("name", "address", "port", "id")}}
            changed = True
        return dataclasses.replace(config, sections=sections) if changed else None

    @staticmethod
    def _check_admin(settings: Any, source: str) -> None:
        if not settings.admin.loopback and not settings.admin_bind_any:
            raise ConfigError(
                f"admin listener on {settings.admin}, which is not loopback; the admin API is "
                "unauthenticated, so set `admin_bind_any = true` to allow it",
                source=source,
                path="sidecar.admin",
            )

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Sidecar:
        self.stopped = anyio.Event()
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)
            s = self.settings
            # Bind first: a port in use fails before the mesh starts anything.
            for name in ("admin", "outbound", "inbound"):
                address: Address = s[name]
                try:
                    listener = await anyio.create_tcp_listener(
                        local_host=address.host, local_port=address.port, backlog=1024
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen on {address}: {exc.strerror or exc}",
                        source=self._pending.config.source,
                        path=f"sidecar.{name}",
                    ) from None
                stack.push_async_callback(listener.aclose)
                self._listeners[name] = listener
                port = listener.listeners[0].extra(SocketAttribute.local_port)
                self.addresses[name] = Address(address.host, port)
            mesh, self._pending = self._pending, None
            mesh = self._build(self._raw, self.addresses["inbound"])
            self._number += 1
            self.generation = Generation(self._number, mesh)
            await self._tg.start(self.generation.run, name="generation:1")
            stack.push_async_callback(self._stop_generation)
            for name, multi in self._listeners.items():
                scope = self._accepting[name] = anyio.CancelScope()
                for listener in multi.listeners:  # one per address family of the host
                    self._tg.start_soon(self._accept, name, listener, scope, name=f"accept:{name}")
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        log.info(
            "sidecar up: outbound %s, inbound %s, admin %s, app %s, services: %s",
            self.addresses["outbound"], self.addresses["inbound"], self.addresses["admin"],
            s.app, ", ".join(self.generation.mesh.upstreams) or "none",
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

    @property
    def ready(self) -> bool:
        gen = self.generation
        return not self.draining and gen is not None and gen.ready

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (drain, then return) handling SIGHUP as a reload."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                    continue
                log.info("%s: draining (deadline %.1f s)", signal.Signals(signum).name, self.settings.drain)
                await self.drain()
                return

    # -- accepting ----------------------------------------------------------------------------

    async def _accept(self, name: str, listener: Any, scope: anyio.CancelScope) -> None:
        conns = self.connections[name]
        tg = self._tg
        limit = self.settings.max_connections
        with scope:
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                except OSError as exc:  # EMFILE and friends: back off instead of spinning
                    log.warning("accept on %s failed: %s", name, exc)
                    await anyio.sleep(0.1)
                    continue
                if len(conns) >= limit:
                    self.telemetry.connections_rejected[name] += 1
                    await anyio.aclose_forcefully(stream)
                    continue
                conn = Connection(name)
                conns.add(conn)
                self.telemetry.connections_total[name] += 1
                tg.start_soon(self._serve_connection, conn, stream)  # type: ignore[union-attr]
        with anyio.CancelScope(shield=True):
            await listener.aclose()

    async def _serve_connection(self, conn: Connection, stream: Any) -> None:
        name = conn.listener
        try:
            with conn.scope:
                remote = stream.extra(SocketAttribute.remote_address, None)
                if isinstance(remote, tuple):
                    conn.client_ip = str(remote[0]).encode()
                ssl_context = None
                if name == "outbound":
                    handler = self._outbound_handler(conn)
                elif name == "inbound":
                    handler = self._inbound_handler(conn)
                    gen = self.generation
                    ssl_context = gen.mesh.plugins.server_tls(gen.mesh) if gen else None
                else:
                    handler = admin_handler(self)
                # Over mTLS the engine runs the handshake (on the socket it drives directly).
                await serve_connection(
                    stream, handler, limits=self.limits, tls=ssl_context,
                    on_tls_error=self._handshake_failed,
                )
        except Exception:
            log.exception("connection on %s failed", name)
        finally:
            self.connections[name].discard(conn)
            if conn.busy and conn.done is not None:
                conn.done()  # a response the engine never got to write
            if conn.scope.cancel_called:
                await anyio.aclose_forcefully(stream)

    def _handshake_failed(self, info: ConnectionInfo, exc: BaseException) -> None:
        client = info.client[0] if isinstance(info.client, tuple) else info.client
        log.info("inbound TLS handshake from %s failed: %r", client, exc)
        self.telemetry.local_error("inbound", "tls", "handshake_failed")

    # -- request accounting --------------------------------------------------------------------

    # A request is counted in flight (`self.in_flight`, `gen.in_flight`, `conn.busy`) from the
    # handler's first line until its response is over. Most responses are over when the
    # handler returns (the body came whole with the head): the handler then uncounts it
    # itself (`_release`), with no callback made. Only a response the engine still has to
    # stream, or an error answer, gets a `done` callback (`_done`), which the body calls when
    # the engine closes it, or the connection's cleanup when the engine never wrote it.

    def _release(self, gen: Generation) -> None:
        gen.in_flight -= 1
        if gen.in_flight == 0 and gen is not self.generation:
            gen.idle.set()
        self.in_flight -= 1
        if self.in_flight <= 0 and self._quiet is not None:
            self._quiet.set()

    def _done(self, conn: Connection, gen: Generation) -> Callable[[], None]:
        finished = False

        def done() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            if conn.done is done:
                conn.busy = False
                conn.done = None
            self._release(gen)

        conn.done = done
        return done

    def _local(
        self,
        direction: str,
        service: str,
        status: int,
        reason: str,
        message: str,
        done: Callable[[], None],
        start: float,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> Response:
        self.telemetry.local_error(direction, service, reason)
        self.telemetry.observe(direction, service, status, _now() - start)
        body = f"meshcore: {message}\n".encode()
        headers = Headers.__new__(Headers)
        headers.extend(
            (
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
                (b"x-meshcore-error", reason.encode()),
                *extra,
            )
        )
        if self.draining:
            headers.append((b"connection", b"close"))
        return Response(status, headers, _Tracked(body, done))

    async def _finish(
        self, response: Response, done: Callable[[], None], direction: str, service: str, start: float
    ) -> Response:
        """Hand a proxied response to the engine, knowing when it is over.

        A small body with a Content-Length (up to `_GLUE`) is read first, so the engine writes
        head and body in one send: measured on trio, a separate send for the head cost about
        35 µs of CPU and a packet per request. Such a body usually arrived with the head, so
        this adds no wait. While draining every response is streamed and tracked instead, so
        a connection is only closed once its response is written.
        """
        if self.draining:
            response.headers.append((b"connection", b"close"))
        else:  # a body the engine has not read whole (a BufferedBody is the handlers' own case)
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) <= _GLUE:
                try:
                    await response.aread()
                except Exception as exc:
                    await response.aclose()
                    status, reason = classify(exc)
                    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    return self._local(direction, service, status, reason, first_line, done, start)
                done()
                return response
        response.stream = _Tracked(response.stream, done)
        return response

    # -- outbound: the local app calls mesh services -------------------------------------------

    def _outbound_handler(self, conn: Connection) -> Callable[[Request, ConnectionInfo], Any]:
        telemetry = self.telemetry
        observe = telemetry.observe
        pipeline_requests = telemetry.pipeline_requests
        release = self._release
        now = loop_clock()  # made in the connection's task: anyio's clock, bound to the loop

        async def handle(request: Request, info: ConnectionInfo) -> Response:
            start = now()
            gen = self.generation
            assert gen is not None
            conn.busy = True
            self.in_flight += 1
            gen.in_flight += 1
            done = None
            try:
                service = request.url.host
                upstream = gen.mesh.upstreams.get(service)
                if upstream is None:
                    known = ", ".join(sorted(gen.mesh.upstreams)) or "none"
                    done = self._done(conn, gen)
                    return self._local(
                        "outbound", service, 404, "no_route",
                        f"no route: {service!r} is not a mesh service (services: {known})",
                        done, start,
                    )
                request.headers = request_headers(request.headers, conn.client_ip)
                stream = request.stream
                if not isinstance(stream, bytes):
                    length = request.headers.get("content-length")
                    limit = gen.settings.retry_buffer
                    if length is not None and length.isdigit() and int(length) <= limit:
                        await request.aread()  # held in full: a retry may resend it
                pipeline_requests[service] += 1
                try:
                    response = await upstream.send(request)
                except RequestRejected:
                    raise
                except Exception as exc:
                    status, reason = classify(exc)
                    if status == 500:
                        log.exception("outbound request to %s failed", service)
                    extra = ()
                    if reason == "circuit_open":
                        wait = max(0.0, getattr(exc, "retry_at", 0.0) - _now())
                        extra = ((b"retry-after", b"%d" % max(1, round(wait))),)
                    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    done = self._done(conn, gen)
                    return self._local("outbound", service, status, reason, first_line, done, start, extra)
                response.headers = response_headers(response.headers)
                observe("outbound", service, response.status_code, now() - start)
                if type(response.stream) is BufferedBody and not self.draining:
                    # The whole body came with the head (the engine's usual case for small
                    # bodies): the response is over for the sidecar, and the engine writes
                    # the body in the same send as the head.
                    conn.busy = False
                    release(gen)
                    return response
                done = self._done(conn, gen)
                return await self._finish(response, done, "outbound", service, start)
            except BaseException:
                if done is None:
                    conn.busy = False
                    release(gen)
                else:
                    done()
                raise

        return handle

    # -- inbound: other sidecars call the local app ---------------------------------------------

    def _inbound_handler(self, conn: Connection) -> Callable[[Request, ConnectionInfo], Any]:
        telemetry = self.telemetry
        observe = telemetry.observe
        release = self._release
        now = loop_clock()

        async def handle(request: Request, info: ConnectionInfo) -> Response:
            start = now()
            gen = self.generation
            assert gen is not None
            conn.busy = True
            self.in_flight += 1
            gen.in_flight += 1
            done = None
            service = gen.service
            try:
                if gen.authorize:
                    reason = gen.mesh.plugins.authorize(request, info.ssl_object, gen.mesh)
                    if reason:
                        telemetry.denied += 1
                        done = self._done(conn, gen)
                        return self._local(
                            "inbound", service, 403, "denied", f"forbidden: {reason}", done, start
                        )
                identity = conn.identity
                if identity is None and info.ssl_object is not None:
                    identity = conn.identity = peer_identity(info.ssl_object) or b""
                request.headers = request_headers(
                    request.headers, conn.client_ip, identity=identity, inbound=True
                )
                try:
                    response = await gen.app_connector.send(gen.app, request)
                except RequestRejected:
                    raise
                except Exception as exc:
                    status, reason = classify(exc)
                    if reason == "connect_failed":
                        reason = "app_unreachable"
                    elif status == 500:
                        log.exception("inbound request to the app failed")
                    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    done = self._done(conn, gen)
                    return self._local("inbound", service, status, reason, first_line, done, start)
                response.headers = response_headers(response.headers)
                observe("inbound", service, response.status_code, now() - start)
                if type(response.stream) is BufferedBody and not self.draining:
                    conn.busy = False  # over for the sidecar (see the outbound handler)
                    release(gen)
                    return response
                done = self._done(conn, gen)
                return await self._finish(response, done, "inbound", service, start)
            except BaseException:
                if done is None:
                    conn.busy = False
                    release(gen)
                else:
                    done()
                raise

        return handle

    # -- drain --------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        for name, scope in self._accepting.items():
            if name != "admin":
                scope.cancel()

    async def drain(self, deadline: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to `deadline` s), close the rest."""
        if deadline is None:
            deadline = self.settings.drain
        self.draining = True
        self.stop_accepting()
        for name in ("outbound", "inbound"):
            listener = self._listeners.get(name)
            if listener is not None:  # closed now, not when the accept task next runs
                with anyio.CancelScope(shield=True):
                    await listener.aclose()
        self._quiet = anyio.Event()
        if self.in_flight <= 0:
            self._quiet.set()
        self._close_idle()
        with anyio.move_on_after(deadline) as scope:
            if not self._quiet.is_set():
                await self._quiet.wait()
        if scope.cancelled_caught:
            log.warning("drain deadline (%.1f s) passed with %d requests in flight", deadline, self.in_flight)
        else:
            log.info("drained: no requests in flight")
        for name in ("outbound", "inbound"):
            for conn in list(self.connections[name]):
                conn.scope.cancel()
        # Let cancelled connections run their cleanup before the mesh goes away.
        with anyio.move_on_after(1.0):
            while self.connections["outbound"] or self.connections["inbound"]:
                await anyio.sleep(0.005)
        if "admin" in self._accepting:
            self._accepting["admin"].cancel()
        for conn in list(self.connections["admin"]):
            conn.scope.cancel()
        if self.stopped is not None:
            self.stopped.set()

    def _close_idle(self) -> None:
        for name in ("outbound", "inbound"):
            for conn in list(self.connections[name]):
                if not conn.busy:
                    conn.scope.cancel()

    # -- reload -------------------------------------------------------------------------------

    async def reload(self, config: MeshConfig | dict[str, Any] | None = None) -> str | None:
        """Load and start a new config; None on success, else the reason it was refused."""
        try:
            if config is None:
                if self.config_path is None:
                    raise ConfigError("no config file to reload (started from a config object)")
                config = MeshConfig.load(self.config_path)
            mesh = self._build(config, self.addresses.get("inbound"))
            settings = mesh.config.section("sidecar")
            for key in _LISTENER_KEYS:
                if settings[key] != self.settings[key]:
                    raise ConfigError(
                        f"changed from {self.settings[key]} to {settings[key]}; listener settings "
                        "take effect on restart only",
                        source=mesh.config.source,
                        path=f"sidecar.{key}",
                    )
            self._number += 1
            gen = Generation(self._number, mesh)
            await self._tg.start(gen.run, name=f"generation:{gen.number}")  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old config
            self.telemetry.reloads["refused"] += 1
            log.error("reload refused, keeping config generation %s: %s",
                      self.generation.number if self.generation else "-", exc)
            return str(exc)
        old, self.generation = self.generation, gen
        self.settings = settings
        self.limits = server_limits(settings)
        self.telemetry.reloads["ok"] += 1
        log.info("reloaded: config generation %d, services: %s", gen.number,
                 ", ".join(gen.mesh.upstreams) or "none")
        if old is not None:
            self._tg.start_soon(self._retire, old)  # type: ignore[union-attr]
        return None

    async def _retire(self, gen: Generation) -> None:
        if gen.in_flight > 0:
            with anyio.move_on_after(self.settings.drain):
                await gen.idle.wait()
        await gen.stop()

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
            "draining": self.draining,
            "ready": self.ready,
            "in_flight": self.in_flight,
            "service": self.settings.service,
            "app": str(self.settings.app),
            "advertise": str(self.advertise),
            "registration": self.registration,
            "listeners": {name: str(a) for name, a in self.addresses.items()},
            "connections_open": {name: len(c) for name, c in self.connections.items()},
        }

    def state(self) -> dict[str, Any]:
        gen = self.generation
        state = gen.mesh.state() if gen else {}
        return {**state, "sidecar": {**self.stats(), "telemetry": self.telemetry.as_dict()}}


async def run_sidecar(
    config: MeshConfig,
    plugins: Sequence[str] | None,
    config_path: str | None,
    on_ready: Callable[[Sidecar], None] | None = None,
) -> None:
    """The body of `meshcore run`: start, serve until a stop signal, drain, stop."""
    sidecar = Sidecar(config, plugins, config_path=config_path)
    async with sidecar:
        if on_ready is not None:
            on_ready(sidecar)
        await sidecar.serve()
