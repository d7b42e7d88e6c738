"""The httpx transport of library mode: the outermost adapter, converting httpx <-> mesh once.

A request whose host is a mesh service becomes a mesh `Request` and goes through that
service's pipeline; any other host passes through to httpx's own transport (unless the config
sets `[mesh] pass_through = false`). A single-label host that then does not resolve is most
likely a typo of a service name (`http://ordres/`), so that failure says which services exist
and which one was probably meant, instead of the resolver's bare "Name or service not known".
"""

from __future__ import annotations

import difflib
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from ._errors import MeshError, MeshNotRunning, UnknownService
from ._models import URL, Headers, Request

if TYPE_CHECKING:
    from ._mesh import Mesh

__all__ = ["MeshTransport"]


class _ResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_body",)

    def __init__(self, body: Any) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._body, "aclose", None)
        if aclose is not None:
            await aclose()


class MeshTransport(httpx.AsyncBaseTransport):
    """Routes mesh hosts through the mesh and passes other hosts through."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._services = mesh.config.services
        self._pass_through = mesh.config.mesh.pass_through
        self._passthrough: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.host
        if host not in self._services:
            return await self._pass(request)
        mesh = self.mesh
        try:
            if not mesh.running:
                raise MeshNotRunning(
                    f"request to mesh service {host!r}: the mesh is not running "
                    "(it has not started yet or has already closed)",
                    service=host,
                )
            upstream = mesh.upstreams[host]
            try:
                body: Any = request.content
            except httpx.RequestNotRead:
                body = request.stream
            mreq = Request(
                request.method,
                URL(url.scheme, host, url.port, url.raw_path.decode("ascii")),
                Headers.__new__(Headers),
                body,
                dict(request.extensions),
            )
            mreq.headers.extend(request.headers.raw)
            response = await upstream.send(mreq)
        except MeshError as exc:
            exc.request = request
            raise
        stream = response.stream
        if isinstance(stream, bytes):
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=httpx.ByteStream(stream),
                extensions=response.extensions,
            )
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_ResponseStream(stream),
            extensions=response.extensions,
        )

    async def _pass(self, request: httpx.Request) -> httpx.Response:
        if not self._pass_through:
            host = request.url.host
            raise MeshError(
                f"host {host!r} is not a mesh service and pass-through is off "
                f"(services: {', '.join(self._services) or 'none'}).{_did_you_mean(host, self._services)}"
            )
        if self._passthrough is None:
            self._passthrough = httpx.AsyncHTTPTransport()
        try:
            return await self._passthrough.handle_async_request(request)
        except httpx.ConnectError as exc:
            host = request.url.host
            if "." in host or ":" in host or not _did_not_resolve(exc):
                raise
            services = list(self._services)
            suggestions = difflib.get_close_matches(host, services, n=3)
            unknown = UnknownService(
                f"host {host!r} is not a mesh service and does not resolve ({exc}).{_did_you_mean(host, services)} "
                f"Mesh services: {_listing(services)}.",
                host=host, suggestions=suggestions, services=services,
            )
            unknown.request = request
            raise unknown from exc

    async def aclose(self) -> None:
        if self._passthrough is not None:
            await self._passthrough.aclose()
            self._passthrough = None


def _did_you_mean(host: str, services: Any) -> str:
    close = difflib.get_close_matches(host, list(services), n=3)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _listing(services: list[str], most: int = 20) -> str:
    if len(services) <= most:
        return ", ".join(services) or "none"
    return f"{', '.join(services[:most])}, ... ({len(services)} in all)"


def _did_not_resolve(exc: BaseException) -> bool:
    """Whether a connect failure was the name lookup (httpx keeps the resolver's gaierror in
    the cause chain on asyncio and trio alike)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
