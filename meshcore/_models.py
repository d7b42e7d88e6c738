"""meshcore's own light Request / Response, the types every pipeline speaks.

Why not httpx's: the pipeline runs on every request, in library mode and in the sidecar, and
httpx objects cost more to build than the whole rest of the path (about 2,400 Python calls per
GET, `shared/reference/performance-baselines.md`). These are plain slotted objects with the
attribute names httpx uses (`method`, `url`, `headers`, `stream`, `extensions`), so they feel
familiar; library mode converts httpx <-> mesh types once, at the transport.

A body (`stream`) is either `bytes` (known in full, so it can be replayed by a retry) or an
async iterable of `bytes` chunks (streamed, read at most once).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, SupportsIndex, overload

__all__ = ["URL", "Headers", "Request", "Response", "Body"]

Body = bytes | AsyncIterable[bytes]

_DEFAULT_PORTS = {"http": 80, "https": 443}


class URL:
    """An absolute URL split into the parts a proxy needs: scheme, host, port, target.

    `target` is the request target as sent on the wire: path plus query, e.g. `/items/7?x=1`.
    """

    __slots__ = ("scheme", "host", "port", "target")

    def __init__(self, scheme: str, host: str, port: int | None, target: str = "/") -> None:
        self.scheme = scheme
        self.host = host
        self.port = port if port is not None else _DEFAULT_PORTS.get(scheme, 80)
        self.target = target or "/"

    @classmethod
    def parse(cls, text: str) -> URL:
        """Parse `scheme://host[:port]/target`; a bracketed IPv6 host keeps no brackets."""
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise ValueError(f"not an absolute URL: {text!r}")
        slash = rest.find("/")
        query = rest.find("?")
        cut = min(i for i in (slash, query, len(rest)) if i >= 0)
        authority, target = rest[:cut], rest[cut:]
        if target.startswith("?"):
            target = "/" + target
        authority = authority.rpartition("@")[2]
        if authority.startswith("["):
            host, _, port_text = authority[1:].partition("]")
            port_text = port_text.lstrip(":")
        else:
            host, _, port_text = authority.partition(":")
        try:
            port = int(port_text) if port_text else None
        except ValueError:
            raise ValueError(f"bad port in URL: {text!r}") from None
        return cls(scheme.lower(), host.lower(), port, target or "/")

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS.get(self.scheme):
            return host
        return f"{host}:{self.port}"

    def copy_with(
        self, *, scheme: str | None = None, host: str | None = None, port: int | None = None
    ) -> URL:
        return URL(scheme or self.scheme, host or self.host, port or self.port, self.target)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"

    def __repr__(self) -> str:
        return f"URL({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str(self) == other
        return isinstance(other, URL) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _to_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


class Headers(list[tuple[bytes, bytes]]):
    """Raw `(name, value)` byte pairs in wire order, with case-insensitive lookup.

    A list subclass so the engine iterates and serializes it without copying. Looked up by
    name it reads like `httpx.Headers`: `headers["content-type"]` (every value joined with
    ", "; KeyError when absent), `get`, `get_list`, `items()`, `multi_items()`.
    """

    __slots__ = ()

    def __init__(self, items: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        super().__init__((_to_bytes(k), _to_bytes(v)) for k, v in items)

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        """The first value for `name` decoded as latin-1, or `default`."""
        key = _to_bytes(name).lower()
        for k, v in self:
            if k.lower() == key:
                return v.decode("latin-1")
        return default

    def get_all(self, name: str | bytes) -> list[str]:
        key = _to_bytes(name).lower()
        return [v.decode("latin-1") for k, v in self if k.lower() == key]

    get_list = get_all  # httpx's name

    @overload
    def __getitem__(self, key: SupportsIndex) -> tuple[bytes, bytes]: ...
    @overload
    def __getitem__(self, key: slice) -> list[tuple[bytes, bytes]]: ...
    @overload
    def __getitem__(self, key: str) -> str: ...
    def __getitem__(self, key: SupportsIndex | slice | str) -> Any:
        if isinstance(key, str):
            values = self.get_all(key)
            if not values:
                raise KeyError(key)
            return ", ".join(values)
        return super().__getitem__(key)

    # No `keys()`: with it `dict(headers)` would read this list as a mapping, not as pairs.
    def items(self) -> list[tuple[str, str]]:
        """`(name, value)` per name, lower-cased, several values joined with ", " (httpx)."""
        names = dict.fromkeys(k.decode("latin-1").lower() for k, _ in self)
        return [(name, self[name]) for name in names]

    def multi_items(self) -> list[tuple[str, str]]:
        """Every `(name, value)` pair, names lower-cased, in wire order."""
        return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in self]

    @property
    def raw(self) -> list[tuple[bytes, bytes]]:
        return list(self)

    def set(self, name: str | bytes, value: str | bytes) -> None:
        """Replace every value of `name` with one `value`."""
        self.remove_all(name)
        self.append((_to_bytes(name), _to_bytes(value)))

    def remove_all(self, name: str | bytes) -> None:
        key = _to_bytes(name).lower()
        self[:] = [(k, v) for k, v in self if k.lower() != key]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, (str, bytes)):
            key = _to_bytes(name).lower()
            return any(k.lower() == key for k, _ in self)
        return super().__contains__(name)


async def _aiter_bytes(body: Body) -> AsyncIterator[bytes]:
    if isinstance(body, (bytes, bytearray, memoryview)):
        if body:
            yield bytes(body)
        return
    async for chunk in body:
        if chunk:
            yield chunk


async def _read_body(body: Body) -> bytes:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    return b"".join([chunk async for chunk in body])


async def _close_body(body: Body) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


class Request:
    """One request through a mesh pipeline.

    `url` is the logical URL (`http://orders/items/7`) until the terminal rewrites it to the
    picked endpoint; `extensions` carries per-request options and what layers learn
    (see docs/writing-a-plugin.md, "The Request and Response a layer sees").
    """

    __slots__ = ("method", "url", "headers", "stream", "extensions")

    def __init__(
        self,
        method: str,
        url: URL | str,
        headers: Headers | Iterable[tuple[str | bytes, str | bytes]] | None = None,
        stream: Body = b"",
        extensions: dict[str, Any] | None = None,
    ) -> None:
        self.method = method.upper()
        self.url = url if isinstance(url, URL) else URL.parse(url)
        self.headers = headers if isinstance(headers, Headers) else Headers(headers or ())
        self.stream = stream
        self.extensions = {} if extensions is None else extensions

    @property
    def content(self) -> bytes:
        """The body, when it is known in full; call `aread()` first for a streamed body."""
        if isinstance(self.stream, bytes):
            return self.stream
        raise RuntimeError("request body is streamed: await request.aread() first")

    @property
    def replayable(self) -> bool:
        """True when the body is held in full, so the request can be sent again."""
        return isinstance(self.stream, bytes)

    async def aread(self) -> bytes:
        if not isinstance(self.stream, bytes):
            self.stream = await _read_body(self.stream)
        return self.stream

    def copy(self) -> Request:
        """A shallow copy sharing the body, with its own headers and extensions."""
        return Request(
            self.method, self.url, Headers(self.headers), self.stream, dict(self.extensions)
        )

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.url}>"


class Response:
    """One response coming back through a mesh pipeline."""

    __slots__ = ("status_code", "headers", "stream", "extensions")

    def __init__(
        self,
        status_code: int,
        headers: Headers | Iterable[tuple[str | bytes, str | bytes]] | None = None,
        stream: Body = b"",
        extensions: dict[str, Any] | None = None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers if isinstance(headers, Headers) else Headers(headers or ())
        self.stream = stream
        self.extensions = {} if extensions is None else extensions

    @property
    def content(self) -> bytes:
        if isinstance(self.stream, bytes):
            return self.stream
        raise RuntimeError("response body is streamed: await response.aread() first")

    async def aread(self) -> bytes:
        if not isinstance(self.stream, bytes):
            body, self.stream = self.stream, b""
            try:
                self.stream = await _read_body(body)
            finally:
                await _close_body(body)
        return self.stream

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return _aiter_bytes(self.stream)

    async def aclose(self) -> None:
        """Release the body (and its connection) without reading the rest."""
        body, self.stream = self.stream, b""
        await _close_body(body)

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"
