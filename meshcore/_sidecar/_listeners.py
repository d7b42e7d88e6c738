"""The listeners: bind, accept under `max_connections`, run each connection, stop accepting.

Every connection is tracked (`connections_open` in /metrics and /state) so tests can see that
bad input leaves nothing behind, and so drain can close the idle ones and cancel the rest.

TCP listeners accept in batches straight from the listening socket (`_loop.Acceptor`) and
hand the engine the accepted socket itself; UNIX listeners go through anyio's streams.

A connection is *pending* from its accept until its first request head is complete (for
inbound mTLS that includes the handshake). Pending connections have their own, smaller cap
(`max_pending_connections`). At the cap the listener first waits (newcomers queue in the
backlog, as at `max_connections`) until a pending connection speaks, ends, or has been
pending for `PENDING_GRACE`; then that oldest one is closed to make room. So clients that
connect and never speak (or never finish a handshake) cannot hold the slots mesh peers need
for longer than the grace, while a burst of honest clients that are merely slow to send
their first bytes is not cut off: a peer leaves the pending set within a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.stapled import MultiListener

from .._errors import ConfigError
from .._http._loop import MAX_ACCEPT, Acceptor, MakeSocket, _backend_module, task_group
from .._http._server import ConnectionInfo
from .._http._socket import Socket
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


# How long a pending connection is safe from being closed to make room: a peer finishes a
# TLS 1.3 handshake and its first head in about two round trips; a second is far beyond
# that on any network a sidecar serves, and short against an attacker's slot (header_timeout
# is 60 s).
PENDING_GRACE = 1.0


class _Pending:
    """One listener's pending connections, oldest first, with when each was accepted."""

    __slots__ = ("conns", "changed")

    def __init__(self) -> None:
        self.conns: dict[Connection, float] = {}
        self.changed: anyio.Event | None = None  # set when one leaves, for a waiting accept


# The engine's coroutine for one connection: (connection, anyio stream or None, the engine's
# socket or None, who is on the other end or None).
Serve = Callable[["Connection", Any, "Socket | None", "ConnectionInfo | None"], Awaitable[None]]


class _Cancellable(Protocol):
    def cancel(self) -> object: ...


class Connection:
    """One accepted client connection."""

    __slots__ = (
        "listener", "handle", "cancelled", "busy", "done", "identity", "client_ip", "pending",
    )

    def __init__(self, listener: str) -> None:
        self.listener = listener
        # What cancels the running connection: on a TCP listener its asyncio task, or a trio
        # cancel scope (an anyio scope costs about 0.6 KiB more per idle connection,
        # docs/data-path.md); an anyio scope on a UNIX listener. None until it runs.
        self.handle: _Cancellable | None = None
        self.cancelled = False
        self.busy = False
        self.done: Callable[[], None] | None = None
        self.identity: bytes | None = None
        self.client_ip = b""
        # The listener's pending set while this connection is in it (see the module).
        self.pending: _Pending | None = None

    def spoke(self) -> None:
        """The first request head is complete (or the connection ended): no longer pending."""
        pending, self.pending = self.pending, None
        if pending is not None:
            del pending.conns[self]
            if pending.changed is not None:
                pending.changed.set()
                pending.changed = None

    def cancel(self) -> None:
        """End the connection: now if it runs, else as soon as it starts."""
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()


class Listeners:
    """The three listening sockets and the connections accepted on them."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.addresses: dict[str, Address] = {}
        self.connections: dict[str, set[Connection]] = {name: set() for name in PROXYING + ("admin",)}
        # Insertion-ordered, so the first is the oldest (see the module).
        self.pending: dict[str, _Pending] = {name: _Pending() for name in PROXYING}
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
                listener = await tcp_listener(
                    address.host, address.port, reuse_port and name in PROXYING
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
        serve: Serve,
        max_connections: int,
        max_pending: int | None = None,
    ) -> None:
        """Accept on every listener; `max_pending` caps the pending connections of each
        proxying listener (None: `max_connections`)."""
        for name, multi in self._sockets.items():
            scope = self._accepting[name] = anyio.CancelScope()
            for listener in multi.listeners:  # one per address family of the host
                raw = listener.extra(SocketAttribute.raw_socket, None)
                accept = (
                    self._accept_batches
                    if isinstance(raw, socket.socket) and raw.family != socket.AF_UNIX
                    else self._accept
                )
                tg.start_soon(
                    accept, tg, name, listener, scope, serve, max_connections,
                    max_pending or max_connections, name=f"accept:{name}",
                )

    async def _room(self, name: str, limit: int) -> None:
        """At max_connections, stop accepting until one closes: the kernel's backlog queues
        the newcomers, who are served late rather than accepted and dropped (HAProxy's
        maxconn does the same)."""
        conns = self.connections[name]
        while len(conns) >= limit:
            self.telemetry.accept_paused[name] += 1
            freed = self._freed[name] = anyio.Event()
            await freed.wait()

    async def _pending_room(self, name: str, limit: int) -> int:
        """At `limit` pending connections, wait until one leaves or the oldest is past its
        grace, and close that one (see the module); returns how many may be accepted now."""
        pending = self.pending.get(name)
        if pending is None:  # admin: no pending cap
            return MAX_ACCEPT
        conns = pending.conns
        while len(conns) >= limit:
            oldest, since = next(iter(conns.items()))
            age = anyio.current_time() - since
            if age >= PENDING_GRACE:
                oldest.spoke()
                oldest.cancel()
                self.telemetry.pending_closed[name] += 1
                continue
            self.telemetry.accept_paused[name] += 1
            changed = pending.changed = pending.changed or anyio.Event()
            with anyio.move_on_after(PENDING_GRACE - age):
                await changed.wait()
        return limit - len(conns)

    def _admit(self, conn: Connection) -> None:
        """Track a new connection as pending (proxying listeners)."""
        pending = self.pending.get(conn.listener)
        if pending is not None:
            pending.conns[conn] = anyio.current_time()
            conn.pending = pending

    async def _accept_batches(
        self,
        tg: anyio.abc.TaskGroup,
        name: str,
        listener: Any,
        scope: anyio.CancelScope,
        serve: Serve,
        limit: int,
        max_pending: int,
    ) -> None:
        """Accept from the listening socket itself, many per wakeup (`_loop.Acceptor`)."""
        conns = self.connections[name]
        telemetry = self.telemetry
        raw: socket.socket = listener.extra(SocketAttribute.raw_socket)
        try:
            local = raw.getsockname()
        except OSError:  # closed before this task first ran (a sidecar stopped at once)
            return
        wildcard = local[0] in ("0.0.0.0", "::")
        acceptor = Acceptor(raw)
        on_trio = _backend_module() == "anyio._backends._trio"
        # The connections run in the backend's own task group (see `task_group`), which this
        # task then waits for: they outlive the accepting (drain), not the listener's task.
        async with task_group() as spawn:
            try:
                with scope:
                    while True:
                        await self._room(name, limit)
                        room = await self._pending_room(name, max_pending)
                        try:
                            await acceptor.wait()
                            batch = acceptor.accept(min(MAX_ACCEPT, limit - len(conns), room))
                        except OSError as exc:
                            if raw.fileno() == -1:  # the listener was closed
                                break
                            log.warning("accept on %s failed: %s", name, exc)  # EMFILE, ...
                            await anyio.sleep(0.1)
                            continue
                        for sock, address in batch:
                            conn = Connection(name)
                            conns.add(conn)
                            self._admit(conn)
                            telemetry.connections_total[name] += 1
                            info = ConnectionInfo(
                                address[:2], sock.getsockname()[:2] if wildcard else local[:2],
                                None, conn,
                            )
                            spawn(self._run_socket, conn, sock, info, serve, acceptor.socket, on_trio)
            finally:
                acceptor.release()
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def _run_socket(
        self,
        conn: Connection,
        sock: socket.socket,
        info: ConnectionInfo,
        serve: Serve,
        make_socket: MakeSocket,
        on_trio: bool,
    ) -> None:
        """`_run` for a socket `_accept_batches` took: the engine drives it directly. What
        `conn.cancel()` cancels: on asyncio this task (`task_group`'s group ignores a child that
        ends cancelled; anyio's scopes inside let a native cancellation through), on trio a
        trio cancel scope, whose deadline is also the limit of the connection's waits (no scope
        of their own: `_loop._TrioWait`)."""
        conn.client_ip = str(info.client[0]).encode()
        try:
            if conn.cancelled:
                pass  # cancelled before it ran: the engine never saw sock
            elif on_trio:
                import trio

                with trio.CancelScope() as scope:
                    conn.handle = scope
                    await serve(conn, None, make_socket(sock, scope), info)
            else:
                conn.handle = asyncio.current_task()
                await serve(conn, None, make_socket(sock, None), info)
        except Exception:
            log.exception("connection on %s failed", conn.listener)
        finally:
            conn.handle = None  # the task refers to this connection's frames: no cycle left
            self._ended(conn)
            if conn.cancelled:
                sock.close()  # cancelled before the engine started: it never closed it

    async def _accept(
        self,
        tg: anyio.abc.TaskGroup,
        name: str,
        listener: Any,
        scope: anyio.CancelScope,
        serve: Serve,
        limit: int,
        max_pending: int,
    ) -> None:
        conns = self.connections[name]
        telemetry = self.telemetry
        with scope:
            while True:
                await self._room(name, limit)
                await self._pending_room(name, max_pending)
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
                self._admit(conn)
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

    async def _run(self, conn: Connection, stream: Any, serve: Serve) -> None:
        try:
            with anyio.CancelScope() as scope:
                conn.handle = scope
                if conn.cancelled:  # before this task ran
                    scope.cancel()
                remote = stream.extra(SocketAttribute.remote_address, None)
                if isinstance(remote, tuple):
                    conn.client_ip = str(remote[0]).encode()
                await serve(conn, stream, None, None)  # the engine's coroutine: no frame between
        except Exception:
            log.exception("connection on %s failed", conn.listener)
        finally:
            conn.handle = None
            self._ended(conn)
            if conn.cancelled:
                await anyio.aclose_forcefully(stream)

    def _ended(self, conn: Connection) -> None:
        conn.spoke()
        self.connections[conn.listener].discard(conn)
        freed = self._freed.pop(conn.listener, None)
        if freed is not None:
            freed.set()
        if conn.busy and conn.done is not None:
            conn.done()  # a response the engine never got to write

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
                    conn.cancel()

    async def cancel_proxying(self) -> None:
        """Cancel every proxying connection and let them run their cleanup (bounded)."""
        for name in PROXYING:
            for conn in list(self.connections[name]):
                conn.cancel()
        with anyio.move_on_after(1.0):
            while self.connections["outbound"] or self.connections["inbound"]:
                await anyio.sleep(0.005)

    def close_admin(self) -> None:
        if "admin" in self._accepting:
            self._accepting["admin"].cancel()
        for conn in list(self.connections["admin"]):
            conn.cancel()


async def tcp_listener(host: str, port: int, reuse_port: bool) -> MultiListener[Any]:
    """`anyio.create_tcp_listener(host, port, backlog=1024)`, without its resolver call when
    `host` is an IP address: with uvloop that call starts libuv's pool of four resolver
    threads, which the sidecar otherwise never needs (docs/data-path.md, "Start-up time and
    idle memory"). The socket is set up as anyio sets it up."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    # A name or a scoped IPv6 address is anyio's to resolve; anyio < 4.10 cannot wrap a socket.
    if ip is None or "%" in host or not hasattr(anyio.abc.SocketListener, "from_socket"):
        return await anyio.create_tcp_listener(
            local_host=host, local_port=port, backlog=1024, reuse_port=reuse_port
        )
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return MultiListener([await anyio.abc.SocketListener.from_socket(sock)])
