"""The client: `HTTPConnector`, per-endpoint keep-alive pools speaking HTTP/1.1.

Why our own: httpx + httpcore cost about 570 µs per request on this project's machines and get
slower with concurrency (httpcore 1.0.9 rescans every connection per queued request); anyio
streams with the httptools parser proxy 13-24 k requests/s on one core
(`shared/reference/performance-baselines.md`). So the terminal sends here.

The connector opens connections (connect, TLS, the peer check, all within the connect limit),
picks the endpoint's pool (`_pool`) and runs one `exchange` on a connection (`_http11`). The
stale keep-alive race (RFC 9112 §9.3.1) is settled in the exchange: a server may close an idle
connection just as we send on it, and when a *reused* connection fails before any byte of the
response arrived the request got no answer. Idempotent requests with a body held in full are
resent once, on a fresh connection; anything else raises with `replayable=True` so the retry
layer decides. A POST is never resent by the connector.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import anyio

from .._endpoints import Endpoint
from .._models import Request, Response
from ._error_map import IO_ERRORS, endpoint_error
from ._http11 import serialize_head
from ._loop import socket_for
from ._pool import Pool, PoolLimits
from ._socket import Socket, close_stream, start_tls

__all__ = ["HTTPConnector", "Timeouts"]

_DEFAULT_LIMITS = PoolLimits()


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


class HTTPConnector:
    """Sends mesh requests to endpoints over per-endpoint HTTP/1.1 keep-alive pools.

    `ssl_context` turns on TLS for every connection (SNI `server_hostname`, default the
    endpoint address); `verify_peer(endpoint, ssl_object)` runs after each new handshake and
    raises to reject the peer (the connection is closed and the error propagates).
    """

    def __init__(
        self,
        *,
        limits: PoolLimits = _DEFAULT_LIMITS,
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
        self._pools: dict[Endpoint, Pool] = {}
        self._closed = False

    def set_ssl_context(self, ssl_context: ssl.SSLContext | None) -> None:
        """Use `ssl_context` for connections opened from now on (certificate rotation);
        pooled connections keep the context they were opened with until they close."""
        self.ssl_context = ssl_context

    def send(self, endpoint: Endpoint, request: Request) -> Awaitable[Response]:
        """Send `request` to `endpoint`: `await connector.send(...)` returns once the response
        head is parsed. A plain function returning the exchange's coroutine (which also resends
        on a stale connection), so a request, and every wake-up of a suspended one, passes
        through one frame less."""
        if self._closed:
            raise RuntimeError("HTTPConnector is closed")
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = Pool(endpoint, self.limits, self.open)
        ext = request.extensions.get("timeout")
        timeouts = self.timeouts.override(ext) if ext else self.timeouts
        head, body, chunked, close = serialize_head(request)
        idle = pool.idle
        if idle and pool.now() - idle[-1].idle_since <= pool.fresh_for:
            # The warmest idle connection was used within the second, so it is neither
            # expired nor worth a liveness peek (see Pool.acquire).
            return idle.pop().exchange(request, head, body, chunked, close, timeouts, True)
        return self._send(pool, request, head, body, chunked, close, timeouts)

    async def _send(
        self, pool: Pool, request: Request, head: bytes, body: Any, chunked: bool, close: bool,
        timeouts: Timeouts,
    ) -> Response:
        conn, reused = await pool.acquire(timeouts.connect, timeouts.pool)
        return await conn.exchange(request, head, body, chunked, close, timeouts, reused)

    async def open(self, endpoint: Endpoint, timeout: float | None) -> Socket:
        """A new connection to `endpoint`: TCP, TLS and the peer check within `timeout`."""
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(endpoint.address, endpoint.port)
                io = None
                try:
                    io = await socket_for(stream)
                    ssl_object = None
                    if self.ssl_context is not None:
                        ssl_object = await start_tls(
                            io,
                            self.ssl_context,
                            server_side=False,
                            server_hostname=self.server_hostname or endpoint.address,
                        )
                except BaseException:
                    await (close_stream(stream) if io is None else io.aclose())
                    raise
        except IO_ERRORS as exc:
            raise endpoint_error(exc, endpoint, "connect", timeout) from exc
        if self.verify_peer is not None:
            try:
                self.verify_peer(endpoint, ssl_object)
            except BaseException:
                await io.aclose()
                raise
        return io

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
        """Per endpoint id: `open`, `idle`, `in_use` and `waiting` connections, and
        `stale_resends` (requests resent because a reused connection was dead)."""
        return {ep.id: pool.stats() for ep, pool in self._pools.items()}
