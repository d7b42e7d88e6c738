"""A terminal sender over httpx's own transport, one pool per upstream.

The terminal's sender is one replaceable piece (`Upstream.connector`): anything with
`async send(endpoint, request) -> Response` and `async aclose()`. This one is the fallback
and the pass-through path; mesh traffic goes through meshcore's own HTTP/1.1 engine
(`meshcore._http`) when it is available.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from ._endpoints import Endpoint
from ._errors import (
    EndpointConnectError,
    EndpointProtocolError,
    EndpointReadError,
    EndpointTimeout,
)
from ._models import Request, Response

__all__ = ["HttpxSender"]


class HttpxSender:
    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._transport = httpx.AsyncHTTPTransport(verify=ssl_context or True)

    async def send(self, endpoint: Endpoint, request: Request) -> Response:
        scheme = "https" if self._ssl is not None else "http"
        host = f"[{endpoint.address}]" if ":" in endpoint.address else endpoint.address
        url = f"{scheme}://{host}:{endpoint.port}{request.url.target}"
        headers = list(request.headers)
        if b"host" not in (k.lower() for k, _ in headers):
            headers.insert(0, (b"Host", request.url.authority.encode()))
        body: Any = request.stream
        extensions = {k: v for k, v in request.extensions.items() if not k.startswith("meshcore.")}
        try:
            response = await self._transport.handle_async_request(
                httpx.Request(request.method, url, headers=headers, content=body, extensions=extensions)
            )
        except httpx.ConnectTimeout as exc:
            raise EndpointTimeout(f"connect to {endpoint.id} timed out", endpoint=endpoint, replayable=True) from exc
        except httpx.TimeoutException as exc:
            raise EndpointTimeout(f"{endpoint.id}: {type(exc).__name__}", endpoint=endpoint) from exc
        except httpx.ConnectError as exc:
            raise EndpointConnectError(f"connect to {endpoint.id} failed: {exc}", endpoint=endpoint) from exc
        except httpx.RemoteProtocolError as exc:
            raise EndpointProtocolError(f"{endpoint.id}: {exc}", endpoint=endpoint) from exc
        except httpx.TransportError as exc:
            raise EndpointReadError(f"{endpoint.id}: {type(exc).__name__}: {exc}", endpoint=endpoint) from exc
        return Response(
            response.status_code,
            response.headers.raw,
            response.stream,  # type: ignore[arg-type]
            {"http_version": response.extensions.get("http_version", b"HTTP/1.1")},
        )

    async def aclose(self) -> None:
        await self._transport.aclose()
