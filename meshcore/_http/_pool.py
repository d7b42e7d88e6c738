"""The keep-alive pool of one endpoint.

Every pool operation is O(1): idle connections sit in a deque (LIFO, so the warmest is reused
and the coldest expire from the left), waiters in a FIFO deque, and a freed connection or
connection slot is handed straight to the first waiter, so nobody scans anything per request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import httptools

from .._endpoints import Endpoint
from .._errors import EndpointTimeout
from ._http11 import HTTP11Connection
from ._loop import backend_checkpoint, backend_clock
from ._socket import Socket


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
    # A response head over these is a `ResponseHeadTooLarge` (Envoy: `max_headers_count` 100,
    # `max_response_headers_kb` 60).
    max_response_header_count: int = 100
    max_response_header_bytes: int = 61440

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(
                f"max_connections: expected an integer >= 1, got {self.max_connections}"
            )
        if self.max_idle < 0:
            raise ValueError(f"max_idle: expected an integer >= 0, got {self.max_idle}")
        if self.max_response_header_count < 1 or self.max_response_header_bytes < 256:
            raise ValueError(
                "max_response_header_count / max_response_header_bytes: expected integers "
                f">= 1 / >= 256, got {self.max_response_header_count} / "
                f"{self.max_response_header_bytes}"
            )


# Opens a connection to the endpoint within the connect limit (`_connector.HTTPConnector.open`).
Opener = Callable[[Endpoint, float | None], Awaitable[Socket]]


class _Waiter:
    __slots__ = ("conn", "event", "slot")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.conn: HTTP11Connection | None = None
        self.slot = False


class Pool:
    """The keep-alive pool of one endpoint. `open` counts idle, busy and connecting ones."""

    __slots__ = (
        "checkpoint",
        "closed",
        "endpoint",
        "fresh_for",
        "idle",
        "limits",
        "now",
        "open",
        "opener",
        "resends",
        "waiters",
    )

    def __init__(self, endpoint: Endpoint, limits: PoolLimits, opener: Opener) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.opener = opener
        self.idle: deque[HTTP11Connection] = deque()
        self.waiters: deque[_Waiter] = deque()
        self.open = 0
        # Requests sent again on a fresh connection because a reused one turned out dead (the
        # stale keep-alive race, RFC 9112 §9.3.1): invisible to the caller, so counted here.
        self.resends = 0
        self.closed = False
        self.now = backend_clock()
        self.checkpoint = backend_checkpoint()
        # An idle connection younger than this is reused without expiry or liveness checks.
        expiry = limits.idle_expiry
        self.fresh_for = 1.0 if expiry is None else min(1.0, expiry)

    async def acquire(
        self, connect: float | None, pool: float | None, fresh: bool = False
    ) -> tuple[HTTP11Connection, bool]:
        """A connection and whether it was reused from the idle set (`connect` and `pool`:
        the limits for opening one and for waiting for one)."""
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
            return await self._connect(connect), False
        if fresh and idle:
            # At the limit and asked for a fresh connection: trade the coldest idle one in,
            # keeping its slot.
            await idle.popleft().io.aclose()
            return await self._connect(connect), False
        waiter = _Waiter()
        self.waiters.append(waiter)
        try:
            with anyio.fail_after(pool):
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
                    f"no free connection to {self.endpoint.id} within {pool} s "
                    f"({self.open} open, {len(self.waiters)} waiting)",
                    endpoint=self.endpoint,
                    replayable=True,
                ) from None
            raise
        if waiter.conn is not None:
            return waiter.conn, True
        return await self._connect(connect), False

    async def _connect(self, timeout: float | None) -> HTTP11Connection:
        """Open a connection for a slot already counted in `open`."""
        try:
            io = await self.opener(self.endpoint, timeout)
        except BaseException:
            self._slot_freed()
            raise
        limits = self.limits
        return HTTP11Connection(
            io,
            self.endpoint,
            self,
            limits.max_response_header_count,
            limits.max_response_header_bytes,
        )

    async def release(self, conn: HTTP11Connection) -> None:
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

    def keep(self, conn: HTTP11Connection) -> bool:
        """`finish` for the usual case, without a coroutine: `conn` (its response over, not a
        HEAD's) goes to the idle set when it may be reused and nobody waits; False when
        `finish` has to run instead."""
        if conn.keep_alive and not self.closed and not self.waiters and not conn.head:
            idle = self.idle
            if len(idle) < self.limits.max_idle:
                conn.idle_since = self.now()
                idle.append(conn)
                return True
        return False

    async def finish(self, conn: HTTP11Connection) -> None:
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

    async def discard(self, conn: HTTP11Connection) -> None:
        """Close a connection that must not be reused, and free its slot."""
        self._slot_freed()
        await conn.io.aclose()

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
            await conn.io.aclose()

    def stats(self) -> dict[str, int]:
        idle = len(self.idle)
        return {
            "open": self.open,
            "idle": idle,
            "in_use": self.open - idle,
            "waiting": len(self.waiters),
            "stale_resends": self.resends,
        }
