"""The httpx transport of library mode: the outermost adapter, converting httpx <-> mesh once.

A request whose host is a mesh service (`Mesh.route`) becomes a mesh `Request` and goes
through that service's pipeline; any other host passes through to httpx's own transport
(unless the config sets `[mesh] pass_through = false`). A single-label host that then does not
resolve is most likely a typo of a service name (`http://ordres/`), so that failure says which
services exist and which one was probably meant, instead of the resolver's bare "Name or
service not known".

This is the only module of the core that imports httpx, so it is also where mesh errors become
httpx exceptions (`as_httpx_error`): the rest of the core, the engine and the sidecar never
load httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from ._errors import MeshError, not_a_service, unknown_service
from ._models import URL, Headers, Request

if TYPE_CHECKING:
    from ._mesh import Mesh

__all__ = ["MeshTransport", "as_httpx_error"]

_httpx_classes: dict[type[MeshError], type[MeshError]] = {}


def as_httpx_error(exc: MeshError, request: httpx.Request) -> MeshError:
    """`exc`, now also an instance of the httpx exception its class names (`HTTPX_BASE`).

    The same object is kept (traceback, cause, attributes, `attempts`): only its class becomes
    a subclass of both its own class and the httpx one, made once per class. So the
    application's `except httpx.HTTPError` and `except meshcore.NoEndpoints` both catch it.
    """
    cls = type(exc)
    if not isinstance(exc, httpx.HTTPError):
        both = _httpx_classes.get(cls)
        if both is None:
            base = getattr(httpx, cls.HTTPX_BASE)
            both = _httpx_classes[cls] = type(
                cls.__name__, (cls, base), {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
            )
        exc.__class__ = both
    exc.request = request  # type: ignore[attr-defined]  # httpx.HTTPError.request's setter
    return exc


class _ResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_body", "_request")

    def __init__(self, body: Any, request: httpx.Request) -> None:
        self._body = body
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._body:
                yield chunk
        except MeshError as exc:  # the endpoint broke the connection mid-body
            as_httpx_error(exc, self._request)
            raise

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
        try:
            body: Any = request.content
        except httpx.RequestNotRead:
            body = request.stream
        mreq = Request(
            request.method,
            URL(url.scheme, url.host, url.port, url.raw_path.decode("ascii")),
            Headers.__new__(Headers),
            body,
            dict(request.extensions),
        )
        mreq.headers.extend(request.headers.raw)
        try:
            upstream = self.mesh.route(mreq)
            if upstream is None:
                return await self._pass(request)
            response = await upstream.send(mreq)
        except MeshError as exc:
            as_httpx_error(exc, request)
            raise
        stream = response.stream
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=httpx.ByteStream(stream) if isinstance(stream, bytes) else _ResponseStream(stream, request),
            extensions=response.extensions,
        )

    async def _pass(self, request: httpx.Request) -> httpx.Response:
        if not self._pass_through:
            raise as_httpx_error(not_a_service(request.url.host, list(self._services)), request)
        if self._passthrough is None:
            self._passthrough = httpx.AsyncHTTPTransport()
        try:
            return await self._passthrough.handle_async_request(request)
        except httpx.ConnectError as exc:
            unknown = unknown_service(request.url.host, exc, list(self._services))
            if unknown is None:
                raise
            raise as_httpx_error(unknown, request) from exc

    async def aclose(self) -> None:
        if self._passthrough is not None:
            await self._passthrough.aclose()
            self._passthrough = None
