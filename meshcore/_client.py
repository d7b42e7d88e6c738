"""The native client of library mode: httpx's everyday surface on the mesh, without httpx.

`mesh.client()` puts `httpx.AsyncClient` in front of the pipeline, and that client alone cost
about half of library mode's time per request (issue 21: 2.0-2.4x aiohttp's time, where the
engine under it costs 0.25-0.63x of aiohttp's CPU). `mesh.http()` returns this `Client`
instead: it builds meshcore's own `Request`, sends it through the same `Mesh.route` ->
pipeline -> engine as the httpx transport does (discovery, balancing, layers, routing, TLS,
deadlines all apply), and wraps the engine's response in a `ClientResponse` whose headers are
the engine's own list, not a copy. Figures: docs/data-path.md, "The native client".

Errors are meshcore's. When httpx is loaded in the process (the application uses it), they are
also the httpx classes `mesh.client()` raises (`_transport.as_httpx_error`), so `except
httpx.HTTPError` works with either client; nothing here imports httpx itself.

Hosts outside the mesh pass through on the engine too (one pool per host; https verified
against the system's CA store), unless the config sets `[mesh] pass_through = false`.
"""

from __future__ import annotations

# json, urllib.parse, ssl and difflib are imported where used: `import meshcore` (the
# sidecar's start too) imports this module, and most requests need none of them.
import codecs
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Self, TypedDict, Unpack, cast

from ._errors import (
    EndpointError,
    HTTPStatusError,
    MeshError,
    not_a_service,
    unknown_service,
)
from ._models import URL, Headers, Request

if TYPE_CHECKING:
    import ssl

    from ._endpoints import Endpoint
    from ._http import HTTPConnector
    from ._mesh import Mesh
    from ._models import Response

__all__ = ["Client", "ClientResponse"]

# What a `timeout=` argument may be: seconds for every phase, None for no limit, a mapping of
# phases (`connect`, `read`, `write`, `pool`), or an object with those attributes
# (`httpx.Timeout`, `meshcore._http.Timeouts`).
TimeoutTypes = float | None | Mapping[str, float | None] | Any
HeaderTypes = Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[str | bytes, str | bytes]]
ParamTypes = Mapping[str, Any] | Iterable[tuple[str, Any]] | str
_PHASES = ("connect", "read", "write", "pool")


class _UseClientDefault:
    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT: Final = _UseClientDefault()


class RequestOptions(TypedDict, total=False):
    """The keyword arguments of `Client.request` (and `get`, `post`, ..., `stream`)."""

    params: ParamTypes | None
    headers: HeaderTypes | None
    content: bytes | str | AsyncIterable[bytes] | None
    data: Mapping[str, Any] | None
    json: Any
    timeout: TimeoutTypes | _UseClientDefault
    extensions: dict[str, Any] | None
# httpx's default (`httpx.Timeout(5.0)`): the same for both clients, so switching changes nothing.
DEFAULT_TIMEOUT = 5.0

_JSON_TYPE = (b"Content-Type", b"application/json")
_FORM_TYPE = (b"Content-Type", b"application/x-www-form-urlencoded")
# Characters a request target keeps as they are (RFC 3986 pchar, query, and `%` of an
# escape already made); anything else is percent-encoded as UTF-8, as httpx does.
_TARGET_SAFE = "/?&=%:@!$'()*+,;~[]"
_ERROR_TYPES = {1: "Informational response", 3: "Redirect response", 4: "Client error",
                5: "Server error"}

_buffered_body: type | None = None


def _timeout_dict(value: Any) -> dict[str, float | None]:
    """The engine's per-request `extensions["timeout"]` for a `timeout=` argument."""
    if value is None or isinstance(value, (int, float)):
        if isinstance(value, bool) or (value is not None and value < 0):
            raise ValueError(f"timeout: expected seconds >= 0 or None, got {value!r}")
        return dict.fromkeys(_PHASES, value)
    if isinstance(value, Mapping):
        unknown = set(value) - set(_PHASES)
        if unknown:
            raise ValueError(
                f"timeout: unknown phase(s) {', '.join(sorted(unknown))}; expected "
                f"{', '.join(_PHASES)}"
            )
        return {phase: value.get(phase, DEFAULT_TIMEOUT) for phase in _PHASES}
    if all(hasattr(value, phase) for phase in _PHASES):
        return {phase: getattr(value, phase) for phase in _PHASES}
    raise TypeError(
        f"timeout: expected seconds, None, a mapping of {'/'.join(_PHASES)} or an object with "
        f"those attributes (httpx.Timeout), got {type(value).__name__}"
    )


def _raw_headers(headers: HeaderTypes) -> list[tuple[bytes, bytes]]:
    """Byte pairs; a CR or LF (a smuggled header) is the caller's error, raised here rather
    than by the engine, where it would count as a failure of the endpoint."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out = []
    for name, value in items:
        raw_name = name if isinstance(name, bytes) else name.encode("latin-1")
        raw_value = value if isinstance(value, bytes) else str(value).encode("latin-1")
        # ints (CR, LF): `in` then runs memchr without first failing to read the operand as one
        if 13 in raw_name or 10 in raw_name or 13 in raw_value or 10 in raw_value:
            raise ValueError(f"header {raw_name!r}: CR or LF in its name or value")
        out.append((raw_name, raw_value))
    return out


def _primitive(value: Any) -> str:
    # httpx's `primitive_value_to_str`: JSON-style booleans and None.
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    return str(value)


def _encode_params(params: ParamTypes) -> str:
    if isinstance(params, str):
        return params
    from urllib.parse import urlencode

    items = params.items() if isinstance(params, Mapping) else params
    pairs: list[tuple[str, str]] = []
    for key, value in items:
        if isinstance(value, (list, tuple)):
            pairs.extend((key, _primitive(v)) for v in value)
        else:
            pairs.append((key, _primitive(value)))
    return urlencode(pairs)


def _as_app_error(exc: MeshError, request: Request) -> MeshError:
    """`exc` as the application sees it: also the httpx class of its kind if httpx is loaded."""
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        from ._transport import as_httpx_error

        as_httpx_error(exc, httpx.Request(request.method, str(request.url)))
    return exc


class ClientResponse:
    """A response of the native client, with the surface of `httpx.Response` that everyday
    code uses. `headers` is a `meshcore.Headers` (case-insensitive `headers["x"]`, `.get`,
    `.get_list`, `.items()`, `.raw`); `request` is the `meshcore.Request` that was sent.

    A response from `get/post/.../request` has its body read (`content`, `text`, `json()`);
    one from `stream(...)` is read with `aread()` or `aiter_bytes()` inside the block.
    """

    __slots__ = ("_content", "_iterating", "_stream", "extensions", "headers", "request",
                 "status_code")

    def __init__(
        self,
        status_code: int,
        headers: Headers,
        request: Request,
        content: bytes | None = None,
        stream: AsyncIterable[bytes] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.request = request
        self._content = content
        self._stream = stream
        self._iterating = False
        self.extensions = {} if extensions is None else extensions

    @property
    def url(self) -> URL:
        return self.request.url

    @property
    def reason_phrase(self) -> str:
        reason = self.extensions.get("reason_phrase", b"")
        return reason.decode("latin-1") if isinstance(reason, bytes) else str(reason)

    @property
    def http_version(self) -> str:
        version = self.extensions.get("http_version", b"HTTP/1.1")
        return version.decode("ascii") if isinstance(version, bytes) else str(version)

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def is_error(self) -> bool:
        return 400 <= self.status_code < 600

    @property
    def is_redirect(self) -> bool:
        return self.status_code in (301, 302, 303, 307, 308) and (
            self.headers.get("location") is not None
        )

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise RuntimeError(
                "the body of a streamed response has not been read: await response.aread() "
                "inside the `async with client.stream(...)` block first"
            )
        return self._content

    @property
    def encoding(self) -> str:
        """The charset of Content-Type, else UTF-8 (httpx's default)."""
        ctype = self.headers.get("content-type")
        if ctype:
            for param in ctype.split(";")[1:]:
                key, _, value = param.strip().partition("=")
                if key.lower() == "charset" and value:
                    charset = value.strip("'\"")
                    try:
                        return codecs.lookup(charset).name
                    except LookupError:
                        break
        return "utf-8"

    @property
    def text(self) -> str:
        return self.content.decode(self.encoding, errors="replace")

    def json(self, **kwargs: Any) -> Any:
        import json

        return json.loads(self.content, **kwargs)

    @property
    def is_closed(self) -> bool:
        return self._stream is None

    async def aread(self) -> bytes:
        """Read the rest of the body (a no-op once read)."""
        if self._content is None:
            self._content = b"".join([chunk async for chunk in self.aiter_bytes()])
        return self._content

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (the whole body once, when already read)."""
        if self._content is not None:
            if self._content:
                yield self._content
            return
        stream = self._stream
        if stream is None or self._iterating:
            raise RuntimeError("the response body was already read, is being read, or is closed")
        # `_stream` stays set while this runs, so `aclose()` (leaving the `stream` block) frees
        # the connection even when the loop stopped early and this generator is not yet closed.
        self._iterating = True
        try:
            async for chunk in stream:
                if chunk:
                    yield chunk
        except MeshError as exc:  # the endpoint cut the body short
            _as_app_error(exc, self.request)
            raise
        finally:
            self._stream = None
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aiter_text(self) -> AsyncIterator[str]:
        """The body decoded (`encoding`) as it arrives."""
        decoder = codecs.getincrementaldecoder(self.encoding)(errors="replace")
        async for chunk in self.aiter_bytes():
            text = decoder.decode(chunk)
            if text:
                yield text
        text = decoder.decode(b"", final=True)
        if text:
            yield text

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines as they arrive, without their line endings (as `str.splitlines`)."""
        pending = ""
        async for text in self.aiter_text():
            lines = (pending + text).splitlines(keepends=True)
            pending = ""
            last = lines[-1] if lines else ""
            # An unterminated last line, or one ending in "\r" (maybe half of "\r\n"), may go on
            # in the next chunk.
            if last and (len(last.splitlines()[0]) == len(last) or last[-1] == "\r"):
                pending = lines.pop()
            for line in lines:
                yield line.splitlines()[0]
        if pending:
            yield pending.splitlines()[0]

    async def aclose(self) -> None:
        """Release the connection without reading the rest (no-op once read or closed)."""
        stream, self._stream = self._stream, None
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()

    def raise_for_status(self) -> Self:
        """Raise `meshcore.HTTPStatusError` for anything but a 2xx; return self otherwise."""
        if 200 <= self.status_code < 300:
            return self
        kind = _ERROR_TYPES.get(self.status_code // 100, "Invalid status code")
        message = f"{kind} '{self.status_code} {self.reason_phrase}' for url '{self.url}'"
        if self.is_redirect:
            message += f"\nRedirect location: '{self.headers['location']}'"
        error = HTTPStatusError(message, response=self)
        raise _as_app_error(error, self.request)

    def __repr__(self) -> str:
        return f"<ClientResponse [{self.status_code} {self.reason_phrase}]>"


class Client:
    """An HTTP client on the mesh: `async with mesh.http() as http: await http.get(url)`.

    Requests to `http://<service>/...` go through that service's pipeline; other hosts pass
    through on meshcore's engine. `base_url`, `headers`, `params` and `timeout` are defaults
    for every request, as on `httpx.AsyncClient`; each request may override `timeout` and add
    `params`, `headers` and `extensions`.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        base_url: str = "",
        headers: HeaderTypes | None = None,
        params: ParamTypes | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        global _buffered_body
        if _buffered_body is None:
            from ._http import BufferedBody

            _buffered_body = BufferedBody
        self.mesh = mesh
        self.base_url = base_url.rstrip("/")
        if self.base_url and "://" not in self.base_url:
            raise ValueError(f"base_url: expected an absolute URL like http://orders, got {base_url!r}")
        self.timeout = _timeout_dict(timeout)
        self._user_agent = (b"User-Agent", b"meshcore/" + _version().encode())
        self._headers = [(b"Accept", b"*/*"), self._user_agent]
        if headers is not None:
            self._headers = _merge(self._headers, _raw_headers(headers))
        self._params = None if params is None else _encode_params(params)
        self._urls: dict[str, tuple[str, str, int, str]] = {}
        self._passthrough: _PassThrough | None = None
        self._verify = verify
        self._closed = False

    # -- the httpx surface ---------------------------------------------------------------------
    # Plain functions returning `request`'s coroutine: an awaited request passes one frame
    # fewer on every resume (as `Upstream.send`).

    def get(self, url: str | URL, **kwargs: Unpack[RequestOptions]) -> Awaitable[ClientResponse]:
        return self.request("GET", url, **kwargs)

    def head(self, url: str | URL, **kwargs: Unpack[RequestOptions]) -> Awaitable[ClientResponse]:
        return self.request("HEAD", url, **kwargs)

    def options(self, url: str | URL, **kwargs: Unpack[RequestOptions]) -> Awaitable[ClientResponse]:
        return self.request("OPTIONS", url, **kwargs)

    def delete(self, url: str | URL, **kwargs: Unpack[RequestOptions]) -> Awaitable[ClientResponse]:
        return self.request("DELETE", url, **kwargs)

    def post(self, url: str | URL, **kwargs: Unpack[RequestOptions]) -> Awaitable[ClientResponse]:
        return self.request("POST", url, **kwargs)

    def put(self, url: str | URL, **kwargs: Unpack[RequestOptions]) -> Awaitable[ClientResponse]:
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str | URL, **kwargs: Unpack[RequestOptions]) -> Awaitable[ClientResponse]:
        return self.request("PATCH", url, **kwargs)

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        params: ParamTypes | None = None,
        headers: HeaderTypes | None = None,
        content: bytes | str | AsyncIterable[bytes] | None = None,
        data: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: TimeoutTypes | _UseClientDefault = USE_CLIENT_DEFAULT,
        extensions: dict[str, Any] | None = None,
    ) -> ClientResponse:
        """Send a request and read its whole body."""
        request = self.build_request(
            method, url, params=params, headers=headers, content=content, data=data, json=json,
            timeout=timeout, extensions=extensions,
        )
        # `_send`, inline: one frame fewer for every resume of the request.
        if self._closed:
            raise RuntimeError("this client is closed")
        try:
            upstream = self.mesh.route(request)
            if upstream is None:
                response = await self._pass(request)
            else:
                response = await upstream.send(request)
        except MeshError as exc:
            _as_app_error(exc, request)
            raise
        stream = response.stream
        if type(stream) is _buffered_body:
            # The whole body came with the head and its connection is back in the pool.
            content_ = cast(Any, stream).data or b""
        elif isinstance(stream, bytes):
            content_ = stream
        else:
            content_ = await _read_all(stream, request)
        result = _new_response(ClientResponse)
        result.status_code = response.status_code
        result.headers = response.headers
        result.request = request
        result._content = content_
        result._stream = None
        result._iterating = False
        result.extensions = response.extensions
        return result

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str | URL,
        **kwargs: Unpack[RequestOptions],
    ) -> AsyncIterator[ClientResponse]:
        """`async with client.stream("GET", url) as response:` a response whose body is read
        in the block (`aiter_bytes()`, `aread()`); leaving the block releases it. Takes the
        same arguments as `request`."""
        request = self.build_request(method, url, **kwargs)
        response = await self._send(request)
        stream = response.stream
        result = ClientResponse(
            response.status_code, response.headers, request,
            stream if isinstance(stream, bytes) else None,
            None if isinstance(stream, bytes) else stream,
            response.extensions,
        )
        try:
            yield result
        finally:
            await result.aclose()

    def build_request(
        self,
        method: str,
        url: str | URL,
        *,
        params: ParamTypes | None = None,
        headers: HeaderTypes | None = None,
        content: bytes | str | AsyncIterable[bytes] | None = None,
        data: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: TimeoutTypes | _UseClientDefault = USE_CLIENT_DEFAULT,
        extensions: dict[str, Any] | None = None,
    ) -> Request:
        """The `meshcore.Request` that `request(...)` would send (nothing is sent)."""
        if isinstance(url, URL):
            target_url = URL(url.scheme, url.host, url.port, url.target)
        else:
            # A fresh URL from the parts of a string seen before: layers may change theirs.
            parts = self._urls.get(url) or self._parse(url)
            target_url = URL(*parts)
        query = self._params
        if params is not None:
            query = _encode_params(params)
        if query is not None:
            path = target_url.target.partition("?")[0]
            target_url = URL(target_url.scheme, target_url.host, target_url.port,
                             f"{path}?{query}" if query else path)
        raw = Headers.__new__(Headers)
        raw.extend(self._headers)
        body: bytes | AsyncIterable[bytes] = b""
        if content is not None:
            if isinstance(content, str):
                body = content.encode("utf-8")
            elif isinstance(content, (bytes, bytearray, memoryview)):
                body = bytes(content)
            elif isinstance(content, AsyncIterable):
                body = content
            else:
                raise TypeError(
                    "content: expected bytes, str or an async iterable of bytes, got "
                    f"{type(content).__name__}"
                )
        elif data:
            if not isinstance(data, Mapping):
                raise TypeError("data: expected a mapping of form fields (use content= for bytes)")
            body = _encode_params(data).encode("utf-8")
            raw.append(_FORM_TYPE)
        elif json is not None:
            from json import dumps

            body = dumps(
                json, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode("utf-8")
            raw.append(_JSON_TYPE)
        if headers is not None:
            raw[:] = _merge(raw, _raw_headers(headers))
        ext = {
            "timeout": self.timeout.copy() if timeout is USE_CLIENT_DEFAULT else _timeout_dict(timeout)
        }
        if extensions:
            ext.update(extensions)
        request = _new_object(Request)  # the fields its __init__ would set, already checked
        request.method = method.upper()
        request.url = target_url
        request.headers = raw
        request.stream = body
        request.extensions = ext
        return request

    def _parse(self, url: str) -> tuple[str, str, int, str]:
        text = url
        if "://" not in url:
            if not self.base_url:
                raise ValueError(
                    f"not an absolute URL: {url!r} (give one like http://orders/path, or "
                    "base_url= to the client)"
                )
            text = self.base_url + (url if url.startswith("/") else "/" + url)
        text = text.partition("#")[0]
        if "\r" in text or "\n" in text:
            raise ValueError(f"CR or LF in URL {url!r}")
        parsed = URL.parse(text)
        target = parsed.target
        if not target.isascii() or " " in target or '"' in target or "<" in target:
            from urllib.parse import quote

            target = quote(target, safe=_TARGET_SAFE)
        parts = (parsed.scheme, parsed.host, parsed.port, target)
        if len(self._urls) < 1024:  # a client used over a few URLs parses each once
            self._urls[url] = parts
        return parts

    async def _send(self, request: Request) -> Response:
        if self._closed:
            raise RuntimeError("this client is closed")
        try:
            upstream = self.mesh.route(request)
            if upstream is None:
                return await self._pass(request)
            return await upstream.send(request)
        except MeshError as exc:
            _as_app_error(exc, request)
            raise

    async def _pass(self, request: Request) -> Response:
        if self._passthrough is None:
            config = self.mesh.config
            self._passthrough = _PassThrough(
                config.mesh.pass_through, list(config.services), self._verify
            )
        return await self._passthrough.send(request)

    async def aclose(self) -> None:
        self._closed = True
        if self._passthrough is not None:
            await self._passthrough.aclose()
            self._passthrough = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


_new_response = _new_object = object.__new__


def _merge(
    base: list[tuple[bytes, bytes]], override: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """`base` without the names `override` sets, then `override` (httpx's header merge)."""
    names = {name.lower() for name, _ in override}
    return [(k, v) for k, v in base if k.lower() not in names] + override


async def _read_all(stream: Any, request: Request) -> bytes:
    chunks = []
    try:
        async for chunk in stream:
            chunks.append(chunk)
    except MeshError as exc:  # the endpoint cut the body short
        _as_app_error(exc, request)
        raise
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    return b"".join(chunks)


def _version() -> str:
    from . import __version__

    return __version__


class _PassThrough:
    """Hosts outside the mesh, on the engine: one connector for http, one for https."""

    def __init__(
        self, enabled: bool, services: list[str], verify: ssl.SSLContext | bool
    ) -> None:
        self.verify = verify
        self.enabled = enabled
        self.services = services
        self._endpoints: dict[tuple[str, int], Endpoint] = {}
        self._plain: HTTPConnector | None = None
        self._tls: HTTPConnector | None = None

    def _connector(self, scheme: str) -> HTTPConnector:
        from ._http import HTTPConnector, Timeouts

        # The per-request `timeout` extension sets every phase, so these are not used.
        if scheme == "https":
            if self._tls is None:
                self._tls = HTTPConnector(timeouts=Timeouts(), ssl_context=self._context())
            return self._tls
        if self._plain is None:
            self._plain = HTTPConnector(timeouts=Timeouts())
        return self._plain

    def _context(self) -> ssl.SSLContext:
        """httpx's `verify`: True checks against the system's CA store, False checks nothing,
        or the context given."""
        import ssl  # here: only an https host outside the mesh needs it (5 ms of import)

        if isinstance(self.verify, ssl.SSLContext):
            return self.verify
        context = ssl.create_default_context()
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def send(self, request: Request) -> Response:
        url = request.url
        if not self.enabled:
            raise not_a_service(url.host, self.services)
        if url.scheme not in ("http", "https"):
            raise MeshError(f"unsupported URL scheme {url.scheme!r} in {url}")
        from ._endpoints import Endpoint

        key = (url.host, url.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = Endpoint(url.host, url.port)
        try:
            return await self._connector(url.scheme).send(endpoint, request)
        except EndpointError as exc:
            unknown = unknown_service(url.host, exc, self.services)
            if unknown is None:
                raise
            raise unknown from exc

    async def aclose(self) -> None:
        for connector in (self._plain, self._tls):
            if connector is not None:
                await connector.aclose()
