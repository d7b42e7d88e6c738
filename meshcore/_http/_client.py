"""The client side: per-endpoint keep-alive pools speaking HTTP/1.1 over anyio streams.

Why our own: httpx + httpcore cost about 570 µs per request on this project's machines and get
slower with concurrency (httpcore 1.0.9 rescans every connection per queued request); anyio
streams with the httptools parser proxy 13-24 k requests/s on one core
(`shared/reference/performance-baselines.md`). So the terminal sends here.

Shape of one exchange: take a connection (the most recently used idle one, or a new one while
under `max_connections`, or wait in FIFO order), write the request, read until the response
head is parsed, return. The body is an async iterator over the same connection; reading it to
the end gives the connection back to the pool, closing it early closes the connection.

Every pool operation is O(1): idle connections sit in a deque (LIFO, so the warmest is reused
and the coldest expire from the left), waiters in a FIFO deque and a freed connection or
connection slot is handed straight to the first waiter, so nobody scans anything per request.

The stale keep-alive race (RFC 9112 §9.3.1): a server may close an idle connection just as we
send on it. When a *reused* connection fails before any byte of the response arrived, the
request did not get an answer and is safe to resend: idempotent requests with a body held in
full are resent once, on a fresh connection, right here; anything else raises with
`replayable=True` so the retry layer decides. A POST is never resent by the connector.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import anyio
import anyio.lowlevel
import httptools
from anyio.abc import ByteStream

from .._endpoints import Endpoint
from .._errors import (
    EndpointConnectError,
    EndpointProtocolError,
    EndpointReadError,
    EndpointTimeout,
)
from .._models import Headers, Request, Response
from ._parse import (
    DirectSocket,
    backend_checkpoint,
    backend_clock,
    close_stream,
    take_socket,
    tls_handshake,
)

__all__ = ["BufferedBody", "HTTPConnector", "PoolLimits", "Timeouts"]

log = logging.getLogger("meshcore.http")
_new_headers = Headers.__new__
_new_object = object.__new__

# RFC 9110 §9.2.2: the methods whose intended effect does not change when repeated.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods that carry no body by default: no `Content-Length: 0` for them when the body is empty.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
# Errors that mean the connection broke (reset, closed, TLS failure).
_BROKEN = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
    ssl.SSLError,
)
_READ_SIZE = 65536
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
# Bodies up to this size are written in the same send as the head (one syscall).
_GLUE_BODY = 16384


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds per phase of one exchange; None means no limit.

    connect: 5 s, Envoy's default `connect_timeout`. read (between two reads of the response,
    so a slow stream is fine as long as it keeps moving) and write: 60 s, nginx's
    `proxy_read_timeout` / `proxy_send_timeout`. pool (waiting for a free connection): 10 s.
    A request may override any of them with an httpx-style `extensions["timeout"]` dict.
    """

    connect: float | None = 5.0
    read: float | None = 60.0
    write: float | None = 60.0
    pool: float | None = 10.0

    def override(self, ext: dict[str, Any] | None) -> Timeouts:
        if not ext:
            return self
        return Timeouts(
            ext.get("connect", self.connect),
            ext.get("read", self.read),
            ext.get("write", self.write),
            ext.get("pool", self.pool),
        )


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """Bounds of one endpoint's pool.

    max_connections 100 (Envoy's default cluster `max_connections` is 1024 for a whole
    cluster; 100 per endpoint keeps one client from exhausting a small upstream's workers),
    max_idle 20 connections kept for reuse, idle_expiry 60 s (below nginx's 75 s
    `keepalive_timeout`, so we drop a connection before the server does).
    """

    max_connections: int = 100
    max_idle: int = 20
    idle_expiry: float | None = 60.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(
                f"max_connections: expected an integer >= 1, got {self.max_connections}"
            )
        if self.max_idle < 0:
            raise ValueError(f"max_idle: expected an integer >= 0, got {self.max_idle}")


class _NoScope:
    """Stands in for a cancel scope when an exchange has no write or read limit."""

    __slots__ = ("deadline",)
    cancelled_caught = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


class _Stale(Exception):
    """A reused connection closed before any byte of the response: the request may be resent."""


class _Timeout(Exception):
    """A wait on the connection outlasted its limit; `args[0]` is the phase (read or write)."""


class _Connection:
    """One HTTP/1.1 connection, and the httptools callbacks that parse its responses."""

    __slots__ = (
        "chunks",
        "close_delimited",
        "complete",
        "direct",
        "io",
        "endpoint",
        "framed",
        "got_bytes",
        "head",
        "headers",
        "headers_done",
        "idle_since",
        "interim",
        "keep_alive",
        "parser",
        "reason",
        "receive",
        "send",
        "sock",
        "status",
        "stream",
        "wait_readable",
        "wait_writable",
    )

    def __init__(
        self, stream: ByteStream, endpoint: Endpoint, io: DirectSocket | None = None
    ) -> None:
        self.stream = stream
        self.receive = stream.receive
        # plain TCP on trio or asyncio: non-blocking calls straight on the socket (DirectSocket)
        self.io = io
        if io is not None:
            self.direct = self.sock = io.sock
            self.wait_readable = io.wait_readable
            self.wait_writable = io.wait_writable
            self.send = self._send_direct
        else:
            self.direct = None
            self.send = self._send_stream
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
            # asyncio hands out a TransportSocket wrapper without recv(); peek on the real one.
            sock = getattr(sock, "_sock", sock)
            self.sock = sock if hasattr(sock, "recv") else None
        self.parser = httptools.HttpResponseParser(self)
        self.endpoint = endpoint
        self.idle_since = 0.0
        self.chunks: list[bytes] = []

    def start(self, head: bool) -> None:
        self.head = head
        self.status = 0
        self.reason = b""
        self.chunks = []
        self.headers = _new_headers(Headers)
        self.headers_done = self.complete = self.interim = False
        self.framed = self.close_delimited = False
        self.keep_alive = True
        self.got_bytes = False

    # httptools callbacks -------------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        n = len(name)
        if n == 14 or n == 17:
            low = name.lower()
            if low == b"content-length" or low == b"transfer-encoding":
                self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                raise EndpointProtocolError(
                    "101 Switching Protocols is not supported", endpoint=self.endpoint
                )
            self.interim = True  # 1xx: llhttp completes it as a bodiless message; skip it
            return
        self.status = status
        self.headers_done = True
        if self.head:
            # llhttp does not know the request was HEAD and would wait for Content-Length bytes.
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
        elif not self.framed and status != 204 and status != 304:
            self.close_delimited = True  # body ends when the server closes (RFC 9112 §6.3)
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if not self.head:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.interim:  # the real response's head starts afresh
            self.interim = self.framed = False
            self.headers = _new_headers(Headers)
            return
        if not self.complete:
            self.complete = True
            self.keep_alive = self.keep_alive and self.parser.should_keep_alive()

    # ----------------------------------------------------------------------------------------
    async def _send_stream(self, data: bytes, timeout: float | None) -> None:
        # The exchange's cancel scope bounds it (see HTTPConnector._exchange_stream).
        await self.stream.send(data)

    async def _send_direct(self, data: bytes | memoryview, timeout: float | None) -> None:
        """Send all of `data`; `timeout` bounds each wait for the socket to take more."""
        sock = self.direct
        try:
            sent = sock.send(data)  # type: ignore[union-attr]
        except BlockingIOError:
            sent = 0
        if sent >= len(data):
            return
        view = memoryview(data)[sent:]
        wait = self.wait_writable
        while view:
            try:
                await wait(timeout)
            except TimeoutError:
                raise _Timeout("write") from None
            try:
                view = view[sock.send(view) :]  # type: ignore[union-attr]
            except BlockingIOError:
                pass

    async def recv(self, timeout: float | None) -> bytes:
        """The next bytes from the server, waiting at most `timeout` for them; EndOfStream at
        its end, `_Timeout("read")` when nothing came in time.

        On a direct socket the limit costs something only when the read has to wait: a cancel
        scope per exchange was 7-11 µs of CPU on trio, while under load the answer is nearly
        always there by the time we read (measured behind wrk -c32: 2 % of reads waited).
        """
        sock = self.direct
        if sock is None:
            try:
                if timeout is None:
                    return await self.receive(_READ_SIZE)
                with anyio.fail_after(timeout):
                    return await self.receive(_READ_SIZE)
            except TimeoutError:
                raise _Timeout("read") from None
        while True:
            try:
                data = sock.recv(_READ_SIZE)
            except BlockingIOError:
                try:
                    await self.wait_readable(timeout)
                except TimeoutError:
                    raise _Timeout("read") from None
                continue
            if data:
                return data
            raise anyio.EndOfStream

    def feed(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, EndpointProtocolError):
                raise exc.__context__ from None
            raise EndpointProtocolError(
                f"invalid HTTP response from {self.endpoint.id}: {exc}", endpoint=self.endpoint
            ) from exc
        except httptools.HttpParserError as exc:
            raise EndpointProtocolError(
                f"invalid HTTP response from {self.endpoint.id}: {exc}", endpoint=self.endpoint
            ) from exc

    def peer_closed(self) -> bool:
        """True when the idle connection has data or EOF pending: the server gave up on it."""
        sock = self.sock
        if sock is None:
            return False
        try:
            sock.recv(1, _PEEK_FLAGS)  # b"" (EOF) or stray bytes: either way, unusable
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        except TypeError:  # uvloop's pseudo-socket refuses recv(): no peeking there
            self.sock = None
            return False


async def _close_conn(conn: _Connection) -> None:
    await _close_io(conn.stream, conn.io)


async def _close_io(stream: ByteStream, io: DirectSocket | None) -> None:
    if io is not None and io.owned:
        io.close()  # asyncio: the transport was closed when the socket was taken
    else:
        await close_stream(stream)


class _Waiter:
    __slots__ = ("conn", "event", "slot")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.conn: _Connection | None = None
        self.slot = False


class _Pool:
    """The keep-alive pool of one endpoint. `open` counts idle, busy and connecting ones."""

    __slots__ = (
        "checkpoint",
        "closed",
        "connector",
        "endpoint",
        "fresh_for",
        "idle",
        "limits",
        "now",
        "open",
        "waiters",
    )

    def __init__(self, endpoint: Endpoint, limits: PoolLimits, connector: HTTPConnector) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.connector = connector
        self.idle: deque[_Connection] = deque()
        self.waiters: deque[_Waiter] = deque()
        self.open = 0
        self.closed = False
        self.now = backend_clock()
        self.checkpoint = backend_checkpoint()
        # An idle connection younger than this is reused without expiry or liveness checks.
        expiry = limits.idle_expiry
        self.fresh_for = 1.0 if expiry is None else min(1.0, expiry)

    async def acquire(self, timeouts: Timeouts, fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection and whether it was reused from the idle set."""
        idle = self.idle
        if idle and not fresh:
            expiry = self.limits.idle_expiry
            while idle:
                conn = idle.pop()
                if expiry is not None and self.now() - conn.idle_since > expiry:
                    # The warmest idle connection expired, so every colder one did too.
                    idle.append(conn)
                    await self._close_idle(len(idle))
                    break
                # A connection reused within a second is practically never closed by a
                # server's keep-alive timeout (those are seconds); past that, one peek syscall
                # spares the request the stale-connection round trip.
                if self.now() - conn.idle_since > self.fresh_for and conn.peer_closed():
                    await self.discard(conn)
                    continue
                return conn, True
        if self.open < self.limits.max_connections:
            self.open += 1
            return await self._connect(timeouts), False
        if fresh and idle:
            # At the limit and asked for a fresh connection: trade the coldest idle one in,
            # keeping its slot.
            await _close_conn(idle.popleft())
            return await self._connect(timeouts), False
        waiter = _Waiter()
        self.waiters.append(waiter)
        try:
            if timeouts.pool is None:
                await waiter.event.wait()
            else:
                with anyio.fail_after(timeouts.pool):
                    await waiter.event.wait()
        except BaseException as exc:
            if waiter.conn is not None:
                await self.release(waiter.conn)
            elif waiter.slot:
                self._slot_freed()
            else:
                self.waiters.remove(waiter)  # O(n), but only when a waiter gives up
            if isinstance(exc, TimeoutError):
                raise EndpointTimeout(
                    f"no free connection to {self.endpoint.id} within {timeouts.pool} s "
                    f"({self.open} open, {len(self.waiters)} waiting)",
                    endpoint=self.endpoint,
                    replayable=True,
                ) from None
            raise
        if waiter.conn is not None:
            return waiter.conn, True
        return await self._connect(timeouts), False

    async def _connect(self, timeouts: Timeouts) -> _Connection:
        """Open a connection for a slot already counted in `open`."""
        endpoint = self.endpoint
        connector = self.connector
        try:
            try:
                with anyio.fail_after(timeouts.connect):
                    stream: ByteStream = await anyio.connect_tcp(endpoint.address, endpoint.port)
                    io = None
                    ssl_object = None
                    try:
                        io = await take_socket(stream)
                        if connector.ssl_context is not None:
                            stream, ssl_object = await tls_handshake(
                                stream,
                                io,
                                connector.ssl_context,
                                server_side=False,
                                server_hostname=connector.server_hostname or endpoint.address,
                            )
                    except BaseException:
                        await _close_io(stream, io)
                        raise
            except TimeoutError:
                raise EndpointTimeout(
                    f"connecting to {endpoint.id} took longer than {timeouts.connect} s",
                    endpoint=endpoint,
                    replayable=True,
                ) from None
            except (OSError, anyio.BrokenResourceError, anyio.EndOfStream, ssl.SSLError) as exc:
                raise EndpointConnectError(
                    f"cannot connect to {endpoint.id}: {exc}", endpoint=endpoint
                ) from exc
            if connector.verify_peer is not None:
                try:
                    connector.verify_peer(endpoint, ssl_object)
                except BaseException:
                    await _close_io(stream, io)
                    raise
        except BaseException:
            self._slot_freed()
            raise
        return _Connection(stream, endpoint, io)

    async def release(self, conn: _Connection) -> None:
        """Give a connection whose exchange ended cleanly back (to a waiter, or the idle set)."""
        waiters = self.waiters
        if waiters:
            waiter = waiters.popleft()
            waiter.conn = conn
            waiter.event.set()
            return
        conn.idle_since = self.now()
        self.idle.append(conn)
        if len(self.idle) > self.limits.max_idle or self.closed:
            await self.discard(self.idle.popleft())

    async def finish(self, conn: _Connection) -> None:
        """The response on `conn` ended: reuse the connection if it may be, else close it."""
        if conn.keep_alive and not self.closed:
            if conn.head:
                conn.parser = httptools.HttpResponseParser(conn)
            if not self.waiters and len(self.idle) < self.limits.max_idle:
                conn.idle_since = self.now()  # the usual case of `release`, without the call
                self.idle.append(conn)
                return
            await self.release(conn)
        else:
            await self.discard(conn)

    async def discard(self, conn: _Connection) -> None:
        """Close a connection that must not be reused, and free its slot."""
        self._slot_freed()
        await _close_conn(conn)

    def _slot_freed(self) -> None:
        waiters = self.waiters
        if waiters and not self.closed:
            waiter = waiters.popleft()
            waiter.slot = True
            waiter.event.set()
        else:
            self.open -= 1

    async def _close_idle(self, count: int) -> None:
        for _ in range(count):
            conn = self.idle.popleft()
            await self.discard(conn)

    async def aclose(self) -> None:
        self.closed = True
        while self.idle:
            conn = self.idle.popleft()
            self.open -= 1
            await _close_conn(conn)

    def stats(self) -> dict[str, int]:
        idle = len(self.idle)
        return {
            "open": self.open,
            "idle": idle,
            "in_use": self.open - idle,
            "waiting": len(self.waiters),
        }


class BufferedBody:
    """A response body that arrived whole with the head; its connection is already free.

    Iterates as one chunk like any streamed body; the server side of the engine reads `data`
    directly, so a proxied small response goes out in one send.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    def __aiter__(self) -> BufferedBody:
        return self

    async def __anext__(self) -> bytes:
        data = self.data
        self.data = None
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        self.data = None


class _ResponseBody:
    """The streamed body of one response; owns the connection until the end or `aclose()`."""

    __slots__ = ("_conn", "_pool", "_read_timeout")

    def __init__(self, conn: _Connection, pool: _Pool, read_timeout: float | None) -> None:
        self._conn: _Connection | None = conn
        self._pool = pool
        self._read_timeout = read_timeout

    def __aiter__(self) -> _ResponseBody:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        while True:
            chunks = conn.chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if conn.complete:
                    await self._finish()  # give the connection back before the last chunk
                return data
            if conn.complete:
                await self._finish()
                raise StopAsyncIteration
            await self._read_more(conn)

    async def _read_more(self, conn: _Connection) -> None:
        endpoint = conn.endpoint
        try:
            try:
                data = await conn.recv(self._read_timeout)
            except anyio.EndOfStream:
                if conn.close_delimited:
                    conn.complete = True
                    return
                raise EndpointReadError(
                    f"{endpoint.id} closed the connection in the middle of the response body",
                    endpoint=endpoint,
                ) from None
            except _Timeout:
                raise EndpointTimeout(
                    f"no response data from {endpoint.id} for {self._read_timeout} s",
                    endpoint=endpoint,
                ) from None
            except _BROKEN as exc:
                raise EndpointReadError(
                    f"connection to {endpoint.id} broke while reading the response body: {exc!r}",
                    endpoint=endpoint,
                ) from exc
            conn.feed(data)
        except BaseException:
            self._conn = None
            await self._pool.discard(conn)
            raise

    async def _finish(self) -> None:
        conn = self._conn
        self._conn = None
        if conn is not None:
            await self._pool.finish(conn)

    async def aclose(self) -> None:
        """Stop reading: a finished body returns the connection, an unfinished one closes it."""
        conn = self._conn
        if conn is None:
            return
        if conn.complete:
            await self._finish()
            return
        self._conn = None
        await self._pool.discard(conn)


class HTTPConnector:
    """Sends mesh requests to endpoints over per-endpoint HTTP/1.1 keep-alive pools.

    `ssl_context` turns on TLS for every connection (SNI `server_hostname`, default the
    endpoint address); `verify_peer(endpoint, ssl_object)` runs after each new handshake and
    raises to reject the peer (the connection is closed and the error propagates).
    """

    def __init__(
        self,
        *,
        limits: PoolLimits = PoolLimits(),
        timeouts: Timeouts = Timeouts(),
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        verify_peer: Callable[[Endpoint, Any], None] | None = None,
    ) -> None:
        self.limits = limits
        self.timeouts = timeouts
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.verify_peer = verify_peer
        self._pools: dict[Endpoint, _Pool] = {}
        self._closed = False

    def set_ssl_context(self, ssl_context: ssl.SSLContext | None) -> None:
        """Use `ssl_context` for connections opened from now on (certificate rotation);
        pooled connections keep the context they were opened with until they close."""
        self.ssl_context = ssl_context

    async def send(self, endpoint: Endpoint, request: Request) -> Response:
        """Send `request` to `endpoint`; returns once the response head is parsed."""
        if self._closed:
            raise RuntimeError("HTTPConnector is closed")
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = _Pool(endpoint, self.limits, self)
        ext = request.extensions.get("timeout")
        timeouts = self.timeouts.override(ext) if ext else self.timeouts
        head, body, chunked, close = _serialize_head(request)
        idle = pool.idle
        if idle and pool.now() - idle[-1].idle_since <= pool.fresh_for:
            # Fast path: the warmest idle connection was used within the second, so it is
            # neither expired nor worth a liveness peek (see _Pool.acquire).
            conn, reused = idle.pop(), True
        else:
            conn, reused = await pool.acquire(timeouts)
        try:
            return await self._exchange(
                pool, conn, reused, request, head, body, chunked, close, timeouts
            )
        except _Stale as stale:
            cause = stale.__cause__
            if request.method in _IDEMPOTENT and isinstance(body, bytes):
                conn, _ = await pool.acquire(timeouts, fresh=True)
                return await self._exchange(
                    pool, conn, False, request, head, body, chunked, close, timeouts
                )
            raise EndpointReadError(
                f"{endpoint.id} closed a reused keep-alive connection before answering "
                f"({cause!r}); the request was not resent",
                endpoint=endpoint,
                replayable=True,
            ) from cause

    async def _exchange(
        self,
        pool: _Pool,
        conn: _Connection,
        reused: bool,
        request: Request,
        head: bytes,
        body: Any,
        chunked: bool,
        close: bool,
        timeouts: Timeouts,
    ) -> Response:
        conn.start(request.method == "HEAD")
        read_timeout = timeouts.read
        if conn.direct is None:
            await _exchange_stream(pool, conn, reused, request, head, body, chunked, timeouts)
        else:
            # A direct socket: no cancel scope unless a send or a read has to wait (see
            # _Connection.recv); limits are per wait, so "between two reads/writes" holds.
            phase = "write"
            write_timeout = timeouts.write
            send = conn.send
            try:
                try:
                    if isinstance(body, bytes):
                        if len(body) <= _GLUE_BODY:
                            data = head + body if body else head
                            io = conn.io
                            if io.batch is not None:  # type: ignore[union-attr]
                                # Sent with the others at the end of the loop's pass
                                # (SendBatch); we yield below before reading.
                                io.batch.add(io, data)  # type: ignore[union-attr]
                            else:
                                try:  # the usual case inline: the socket takes it all at once
                                    sent = conn.direct.send(data)
                                except BlockingIOError:
                                    sent = 0
                                if sent < len(data):
                                    await send(memoryview(data)[sent:], write_timeout)
                        else:
                            await send(head, write_timeout)
                            await send(body, write_timeout)
                    else:
                        await send(head, write_timeout)
                        await _send_streamed(conn, body, chunked, request, None, write_timeout)
                    # Let the other tasks run first (as trio's own send would have): the answer
                    # is then often there already, which spares a failed recv and a wait
                    # (measured: less system time per request).
                    await pool.checkpoint()
                    if conn.io.unsent is not None:  # type: ignore[union-attr]
                        await send(conn.io.take_unsent(), write_timeout)  # type: ignore[union-attr]
                    phase = "read"
                    sock = conn.direct
                    feed = conn.feed
                    while not conn.headers_done:
                        try:  # inline as well; `recv` waits when nothing is there yet
                            data = sock.recv(_READ_SIZE)
                        except BlockingIOError:
                            data = await conn.recv(read_timeout)
                        else:
                            if not data:
                                raise anyio.EndOfStream
                        feed(data)
                except _BROKEN as exc:
                    raise _broken(conn, reused, phase, exc) from exc
                except _Timeout as exc:
                    limit = write_timeout if exc.args[0] == "write" else read_timeout
                    raise EndpointTimeout(
                        f"{exc.args[0]} timeout ({limit} s) talking to {conn.endpoint.id}",
                        endpoint=conn.endpoint,
                    ) from None
            except BaseException:
                await pool.discard(conn)
                raise
        if close:  # `Connection: close` from our side ends reuse too
            conn.keep_alive = False
        extensions = {
            "http_version": b"HTTP/1.1" if conn.parser.get_http_version() == "1.1" else b"HTTP/1.0",
            "reason_phrase": conn.reason,
        }
        if conn.complete:
            # The whole body came with the head (most small responses): give the connection
            # back now and hand out the bytes, so nobody pays for a streaming reader.
            # Take what the response needs first: once given back (`finish` may yield, e.g. to
            # close a surplus idle connection), another task may start an exchange on `conn`.
            chunks = conn.chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            conn.chunks = []
            status, headers = conn.status, conn.headers
            await pool.finish(conn)
            # Built without their __init__ (the fields are what it would set): two frames less
            # on every proxied request.
            body = _new_object(BufferedBody)
            body.data = data
            response = _new_object(Response)
            response.status_code = status
            response.headers = headers
            response.stream = body
            response.extensions = extensions
            return response
        return Response(
            conn.status, conn.headers, _ResponseBody(conn, pool, read_timeout), extensions
        )

    async def aclose(self) -> None:
        """Close every idle connection; busy ones close when their response ends."""
        self._closed = True
        for pool in self._pools.values():
            await pool.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per endpoint id: `open`, `idle`, `in_use` and `waiting` counts."""
        return {ep.id: pool.stats() for ep, pool in self._pools.items()}


async def _exchange_stream(
    pool: _Pool,
    conn: _Connection,
    reused: bool,
    request: Request,
    head: bytes,
    body: Any,
    chunked: bool,
    timeouts: Timeouts,
) -> None:
    """Write the request and read the response head through the anyio stream (TLS, uvloop):
    one cancel scope for the exchange, its deadline moved per phase and per read."""
    phase = "write"
    read_timeout = timeouts.read
    write_timeout = timeouts.write
    now = pool.now
    try:
        with (
            anyio.CancelScope()
            if write_timeout is not None or read_timeout is not None
            else _NoScope()
        ) as scope:
            # Every deadline change costs the scheduler work: when write and read limits
            # are equal (the default), one deadline covers the write and the first read.
            if write_timeout is not None:
                scope.deadline = now() + write_timeout
            send = conn.stream.send
            try:
                if isinstance(body, bytes):
                    if len(body) <= _GLUE_BODY:
                        await send(head + body if body else head)
                    else:
                        await send(head)
                        await send(body)
                else:
                    await send(head)
                    await _send_streamed(conn, body, chunked, request, scope, write_timeout, now)
                phase = "read"
                if write_timeout != read_timeout:
                    scope.deadline = math.inf if read_timeout is None else now() + read_timeout
                receive = conn.receive
                while not conn.headers_done:
                    conn.feed(await receive(_READ_SIZE))
                    if read_timeout is not None and not conn.headers_done:
                        scope.deadline = now() + read_timeout
            except _BROKEN as exc:
                raise _broken(conn, reused, phase, exc) from exc
        if scope.cancelled_caught:
            limit = write_timeout if phase == "write" else read_timeout
            raise EndpointTimeout(
                f"{phase} timeout ({limit} s) talking to {conn.endpoint.id}",
                endpoint=conn.endpoint,
            )
    except BaseException:
        await pool.discard(conn)
        raise


def _broken(conn: _Connection, reused: bool, phase: str, exc: BaseException) -> Exception:
    """What to raise when the connection broke during an exchange (`exc`)."""
    endpoint = conn.endpoint
    if reused and not conn.got_bytes:
        return _Stale()
    if isinstance(exc, anyio.EndOfStream):
        return EndpointReadError(
            f"{endpoint.id} closed the connection before a complete response head",
            endpoint=endpoint,
        )
    return EndpointReadError(
        f"connection to {endpoint.id} broke while "
        f"{'sending the request' if phase == 'write' else 'reading the response'}"
        f": {exc!r}",
        endpoint=endpoint,
    )


async def _send_streamed(
    conn: _Connection,
    body: Any,
    chunked: bool,
    request: Request,
    scope: Any,
    write_timeout: float | None,
    now: Callable[[], float] | None = None,
) -> None:
    """Write a streamed body; the write timeout applies to each chunk, not the whole upload.

    With a `scope` (the stream path) its deadline moves per chunk; on a direct socket the
    connection's send bounds each wait itself.
    """
    send = conn.send
    per_chunk = scope is not None and write_timeout is not None
    if chunked:
        async for chunk in body:
            if chunk:
                if per_chunk:
                    scope.deadline = now() + write_timeout  # type: ignore[misc,operator]
                await send(b"%x\r\n%b\r\n" % (len(chunk), chunk), write_timeout)
        await send(b"0\r\n\r\n", write_timeout)
        return
    declared = int(request.headers.get("content-length") or 0)
    sent = 0
    async for chunk in body:
        if chunk:
            sent += len(chunk)
            if sent > declared:
                break
            if per_chunk:
                scope.deadline = now() + write_timeout  # type: ignore[misc,operator]
            await send(chunk, write_timeout)
    if sent != declared:
        raise EndpointProtocolError(
            f"request body is {'longer' if sent > declared else 'shorter'} than its "
            f"Content-Length ({declared})",
            endpoint=conn.endpoint,
        )


def _serialize_head(request: Request) -> tuple[bytes, Any, bool, bool]:
    """The request head as bytes, the body to send, whether it goes chunked, and whether the
    request says `Connection: close` (the connection is not reused after it)."""
    method = request.method
    url = request.url
    body = request.stream
    has_host = has_length = has_te = close = False
    lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"), url.target.encode("latin-1"))]
    append = lines.append
    for name, value in request.headers:
        n = len(name)
        if n == 4 or n == 10 or n == 14 or n == 17:
            low = name.lower()
            if low == b"host":
                has_host = True
            elif low == b"content-length":
                has_length = True
            elif low == b"transfer-encoding":
                has_te = True
            elif low == b"connection" and b"close" in value.lower():
                close = True
        append(name + b": " + value)
    if not has_host:
        append(b"Host: " + url.authority.encode("idna" if not url.host.isascii() else "ascii"))
    chunked = False
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if isinstance(body, bytes):
        if has_te:
            # The caller asked for chunked framing of a body we hold in full: one chunk.
            body = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
        elif not has_length and (body or method not in _NO_BODY_METHODS):
            append(b"Content-Length: %d" % len(body))
    elif not has_length:
        chunked = True
        if not has_te:
            append(b"Transfer-Encoding: chunked")
    else:
        pass
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    # One C-level scan instead of one per header: a CR or LF inside a name or value would
    # let a caller smuggle a header or a second request (RFC 9110 §5.5).
    if head.count(b"\n") != len(lines) + 1 or head.count(b"\r") != len(lines) + 1:
        raise EndpointProtocolError("CR or LF inside a request header or target")
    return head, body, chunked, close
