"""The listeners: bind, accept under `max_connections`, run each connection, stop accepting.

Every connection is tracked (`connections_open` in /metrics and /state) so tests can see that
bad input leaves nothing behind, and so drain can close the idle ones and cancel the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from .._errors import ConfigError
from ._metrics import Telemetry
from ._settings import Address

__all__ = ["NAMES", "Connection", "Listeners"]

log = logging.getLogger("meshcore.sidecar")

NAMES = ("admin", "outbound", "inbound")  # in bind order
PROXYING = ("outbound", "inbound")


# struct ucred (Linux): pid, uid, gid
_UCRED = struct.Struct("3i")


class _Single:
    """A UNIX-socket listener shaped like anyio's MultiListener (a `.listeners` list)."""

    def __init__(self, listener: Any) -> None:
        self.listeners = [listener]

    async def aclose(self) -> None:
        await self.listeners[0].aclose()


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


class Listeners:
    """The three listening sockets and the connections accepted on them."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.addresses: dict[str, Address] = {}
        self.connections: dict[str, set[Connection]] = {name: set() for name in PROXYING + ("admin",)}
        self._sockets: dict[str, Any] = {}
        self._accepting: dict[str, anyio.CancelScope] = {}
        self._freed: dict[str, anyio.Event] = {}  # set when a listener at its cap loses one
        # `outbound_uids` of the current config (set by the sidecar at start and on reload).
        self.peer_uids: frozenset[int] = frozenset()

    async def bind(
        self,
        settings: Any,
        source: str,
        *,
        reuse_port: bool = False,
        overrides: dict[str, Address] | None = None,
    ) -> None:
        """Bind all three (before the mesh starts anything, so a port in use fails first).

        `reuse_port`: the proxying listeners set SO_REUSEPORT, so the workers of one
        `meshcore run --workers N` each accept on the same ports; `overrides` replaces
        configured addresses (a worker's private admin listener)."""
        for name in NAMES:
            address: Address = (overrides or {}).get(name) or settings[name]
            try:
                if address.path:
                    # The mode is set before listen(), so no connection is accepted under the
                    # umask's permissions (anyio: bind, chmod, then listen).
                    unix = await anyio.create_unix_listener(
                        address.path, mode=settings.outbound_mode, backlog=1024
                    )
                    self._sockets[name] = _Single(unix)
                    self.addresses[name] = address
                    continue
                listener = await anyio.create_tcp_listener(
                    local_host=address.host, local_port=address.port, backlog=1024,
                    reuse_port=reuse_port and name in PROXYING,
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {address}: {exc.strerror or exc}",
                    source=source,
                    path=f"sidecar.{name}",
                ) from None
            self._sockets[name] = listener
            port = listener.listeners[0].extra(SocketAttribute.local_port)
            self.addresses[name] = Address(address.host, port)

    def start(
        self,
        tg: anyio.abc.TaskGroup,
        serve: Callable[[Connection, Any], Awaitable[None]],
        max_connections: int,
    ) -> None:
        for name, multi in self._sockets.items():
            scope = self._accepting[name] = anyio.CancelScope()
            for listener in multi.listeners:  # one per address family of the host
                tg.start_soon(
                    self._accept, tg, name, listener, scope, serve, max_connections,
                    name=f"accept:{name}",
                )

    async def _accept(
        self,
        tg: anyio.abc.TaskGroup,
        name: str,
        listener: Any,
        scope: anyio.CancelScope,
        serve: Callable[[Connection, Any], Awaitable[None]],
        limit: int,
    ) -> None:
        conns = self.connections[name]
        telemetry = self.telemetry
        with scope:
            while True:
                # At max_connections, stop accepting until one closes: the kernel's backlog
                # queues the newcomers, who are served late rather than accepted and dropped
                # (HAProxy's maxconn does the same).
                while len(conns) >= limit:
                    telemetry.accept_paused[name] += 1
                    freed = self._freed[name] = anyio.Event()
                    await freed.wait()
                try:
                    stream = await listener.accept()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                except OSError as exc:  # EMFILE and friends: back off instead of spinning
                    log.warning("accept on %s failed: %s", name, exc)
                    await anyio.sleep(0.1)
                    continue
                if self.peer_uids and name == "outbound" and not self._peer_allowed(stream):
                    telemetry.local_error(name, "unix", "peer_uid_refused")
                    await anyio.aclose_forcefully(stream)
                    continue
                conn = Connection(name)
                conns.add(conn)
                telemetry.connections_total[name] += 1
                tg.start_soon(self._run, conn, stream, serve)
        with anyio.CancelScope(shield=True):
            await listener.aclose()

    def _peer_allowed(self, stream: Any) -> bool:
        """Whether the process at the other end of a UNIX socket runs as an allowed user
        (`outbound_uids`): the kernel's SO_PEERCRED, taken when the peer connected."""
        raw = stream.extra(SocketAttribute.raw_socket, None)
        if raw is None or raw.family != socket.AF_UNIX:
            return False
        creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        uid = _UCRED.unpack(creds)[1]
        if uid in self.peer_uids:
            return True
        log.info("outbound: refused a connection from uid %d (outbound_uids)", uid)
        return False

    async def _run(
        self, conn: Connection, stream: Any, serve: Callable[[Connection, Any], Awaitable[None]]
    ) -> None:
        try:
            with conn.scope:
                remote = stream.extra(SocketAttribute.remote_address, None)
                if isinstance(remote, tuple):
                    conn.client_ip = str(remote[0]).encode()
                await serve(conn, stream)  # the engine's coroutine itself: no frame between
        except Exception:
            log.exception("connection on %s failed", conn.listener)
        finally:
            self.connections[conn.listener].discard(conn)
            freed = self._freed.pop(conn.listener, None)
            if freed is not None:
                freed.set()
            if conn.busy and conn.done is not None:
                conn.done()  # a response the engine never got to write
            if conn.scope.cancel_called:
                await anyio.aclose_forcefully(stream)

    async def close(self) -> None:
        for listener in self._sockets.values():
            with anyio.CancelScope(shield=True):
                await listener.aclose()
        for address in self.addresses.values():
            if address.path:
                with contextlib.suppress(OSError):
                    os.unlink(address.path)

    async def stop_accepting(self) -> None:
        """Stop the proxying listeners; their sockets close now (new connections are refused
        by the kernel), not when the accept task next runs."""
        for name in PROXYING:
            scope = self._accepting.get(name)
            if scope is not None:
                scope.cancel()
            listener = self._sockets.get(name)
            if listener is not None:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()

    def close_idle(self) -> None:
        for name in PROXYING:
            for conn in list(self.connections[name]):
                if not conn.busy:
                    conn.scope.cancel()

    async def cancel_proxying(self) -> None:
        """Cancel every proxying connection and let them run their cleanup (bounded)."""
        for name in PROXYING:
            for conn in list(self.connections[name]):
                conn.scope.cancel()
        with anyio.move_on_after(1.0):
            while self.connections["outbound"] or self.connections["inbound"]:
                await anyio.sleep(0.005)

    def close_admin(self) -> None:
        if "admin" in self._accepting:
            self._accepting["admin"].cancel()
        for conn in list(self.connections["admin"]):
            conn.scope.cancel()
