"""The server side: HTTP/1.1 on anyio listeners, for the sidecar's inbound and outbound ports.

One task per connection reads requests with httptools and answers them strictly in order, so
pipelined requests need no bookkeeping beyond a queue of parsed heads. Bodies stream both ways:
the handler gets `request.stream` as an async iterator that reads the connection on demand
(sending `100 Continue` first when the client asked for it), and the response body is written
as the handler's iterator yields it. `ServerConnection` parses and serves in order; each
request's state, from its head to its response, is one `RequestResponseCycle`.

Bad input ends the connection with an answer (RFC 9112 §2.2 lets a server close after an
error): 400 for unparseable requests, 414 for an oversized request line, 431 for too many or too
large headers, 413 for an oversized body, 408 when the head does not arrive in time (those made
before any handler saw the request go to `on_reject`, so the sidecar can count them). Defaults
follow nginx (`large_client_header_buffers 4 8k`, `client_header_timeout 60s`,
`keepalive_timeout 75s`, `client_body_timeout 60s`, `send_timeout 60s`) and Envoy
(`max_headers_count` 100, `max_request_headers_kb` 60).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import httptools
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSAttribute

from .._models import _DEFAULT_PORTS, URL, Headers, Request, Response, _close_body
from ._bodies import MAX_CHUNK_EXCESS, BufferedBody, RequestBody, chunk_excess, head_end
from ._error_map import IO_ERRORS, RequestRejected, client_error
from ._loop import backend_checkpoint, backend_clock, socket_for
from ._reasons import REASONS as _REASONS
from ._socket import Socket, close_stream, receive, recv_now, send_all, start_tls

__all__ = [
    "FIELD_LINES",
    "ConnectionInfo",
    "RequestRejected",
    "ServerLimits",
    "serve_connection",
    "serve_http",
]

log = logging.getLogger("meshcore.http")

_new_headers = Headers.__new__
_new_object = object.__new__
_READ_SIZE = 65536
# Unread request body a keep-alive connection will read and drop after the response; more
# than this and closing is cheaper (nginx discards bodies the same way, `lingering_close`).
_MAX_DRAIN = 1 << 20
_NOT_SEEN = object()
_INF = math.inf
_HEAD_TIMEOUT = "request head not received in time"
_JOIN = b": ".join
_STATUS_LINES: dict[int, tuple[bytes, bytes]] = {}
# A response extension: `(lines, has_length)`, the header fields already serialized as
# `name: value` lines (no Connection or Transfer-Encoding among them), and whether a
# Content-Length is among them. `respond` writes these instead of `response.headers`: a
# proxy that applies its header rules anyway serializes in the same pass.
FIELD_LINES = "meshcore.field_lines"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one connection may send. None means unlimited / no timeout."""

    max_request_line: int = 8192
    max_header_count: int = 100
    max_header_bytes: int = 61440
    max_body: int | None = None
    header_timeout: float | None = 60.0
    idle_timeout: float | None = 75.0
    body_timeout: float | None = 60.0
    write_timeout: float | None = 60.0
    # Longest a TLS handshake may take (nginx `ssl_handshake_timeout` is 60 s; a mesh peer on a
    # LAN needs far less).
    handshake_timeout: float | None = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Who is on the other end: addresses and, over TLS, the `ssl.SSLObject` (peer cert)."""

    client: Any = None
    local: Any = None
    ssl_object: Any = None
    # Whatever the server's owner attached to the connection (the sidecar's per-connection
    # state), so one handler can serve every connection of a listener.
    context: Any = None

    @property
    def tls(self) -> bool:
        return self.ssl_object is not None

    @classmethod
    def from_stream(cls, stream: ByteStream) -> ConnectionInfo:
        return cls(
            stream.extra(SocketAttribute.remote_address, None),
            stream.extra(SocketAttribute.local_address, None),
            stream.extra(TLSAttribute.ssl_object, None),
        )


Handler = Callable[[Request, ConnectionInfo], Awaitable[Response]]


class RequestResponseCycle:
    """One request and its response on a server connection (uvicorn's `RequestResponseCycle`):
    what the parser learned of the request, its body as it arrives, and how it is answered.

    Made by `ServerConnection.on_message_begin` with its fields set in place (no __init__:
    one per request on the hot path); pipelined requests wait in `ServerConnection.ready`.
    """

    __slots__ = (
        "body_size",
        "chunk_count",
        "chunked",
        "chunks",
        "complete",
        "conn",
        "continue_sent",
        "excess",
        "expect",
        "header_bytes",
        "hop_field",
        "headers",
        "headers_done",
        "host",
        "keep_alive",
        "method",
        "url",
        "version",
    )
    conn: ServerConnection
    url: bytes
    headers: Headers
    host: bytes | None
    chunks: list[bytes]
    headers_done: bool
    complete: bool
    expect: bool
    # A field whose name is as long as `Connection` or `Proxy-Connection` (the two llhttp
    # reads for keep-alive): without one, `should_keep_alive()` tells the version.
    hop_field: bool
    continue_sent: bool
    keep_alive: bool
    body_size: int
    chunked: bool
    chunk_count: int
    excess: int
    header_bytes: int
    method: str
    version: str

    def request(self) -> Request:
        """The request to hand to the handler (ValueError for a bad Host)."""
        conn = self.conn
        target = self.url.decode("latin-1")
        if target.startswith("/") or target == "*":
            # A keep-alive client sends the same Host every time: split it once.
            if conn.last_host[0] == self.host:
                host, port = conn.last_host[1]
            else:
                host, port = _split_host(self.host, conn.info, conn.scheme)
                if port is None:
                    port = _DEFAULT_PORTS.get(conn.scheme, 80)
                conn.last_host = (self.host, (host, port))
            # Built without URL.__init__ (the port is already resolved, the target is not
            # empty): the hot path.
            url = _new_object(URL)
            url.scheme = conn.scheme
            url.host = host
            url.port = port
            url.target = target
        elif "://" in target:  # absolute-form (RFC 9112 §3.2.2): it wins over Host
            url = URL.parse(target)
        else:  # authority-form (CONNECT)
            host, port = _split_host(self.url, conn.info, conn.scheme)
            url = URL(conn.scheme, host, port, "/")
        body: Any
        if self.complete and not self.chunks:
            body = b""
        else:  # built without RequestBody.__init__ (what it would set): the hot path
            body = _new_object(RequestBody)
            body.source = body.cycle = self

        # Built without Request.__init__ (the method is the parser's, already upper case, and
        # the headers are a Headers): the hot path.
        request = _new_object(Request)
        request.method = self.method
        request.url = url
        request.headers = self.headers
        request.stream = body
        request.extensions = {"http_version": b"HTTP/1.1" if self.version == "1.1" else b"HTTP/1.0"}
        return request

    async def receive_body(self) -> None:
        """Read more of the request body into `chunks` (sending `100 Continue` first when the
        client waits for it)."""
        conn = self.conn
        limits = conn.limits
        if self.expect and not self.continue_sent:
            self.continue_sent = True
            try:
                await send_all(conn.io, b"HTTP/1.1 100 Continue\r\n\r\n", limits.write_timeout)
            except IO_ERRORS as exc:
                raise RequestRejected(400, f"cannot send 100 Continue: {exc!r}") from None
        timeout = limits.body_timeout
        try:
            data = await receive(conn.io, _READ_SIZE, timeout)  # a limit only when it waits
        except IO_ERRORS as exc:
            raise client_error(exc, "sending the request body", timeout) from None
        if not data:
            raise RequestRejected(400, "client went away during the request body")
        conn.feed(data)
        if conn.upgraded and not self.complete:
            self.complete = True

    async def drain(self) -> bool:
        """Read and drop the rest of a body the handler left, within a budget."""
        budget = _MAX_DRAIN
        chunks = self.chunks
        try:
            while not self.complete:
                budget -= sum(map(len, chunks))
                chunks.clear()
                if budget < 0:
                    return False
                await self.receive_body()
        except RequestRejected:
            return False
        chunks.clear()
        return True

    async def respond(self, response: Response, keep_alive: bool) -> bool:
        """Write the response; returns whether the connection may carry another request."""
        conn = self.conn
        status = response.status_code
        body = response.stream
        extensions = response.extensions
        reason = extensions.get("reason_phrase") or _REASONS.get(status, b"")
        # The status line of the last reason seen per status, not formatted again: a dict
        # read and a compare, 0.8 k instructions less than `%` formatting.
        known = _STATUS_LINES.get(status)
        if known is not None and known[0] == reason:
            status_line = known[1]
        else:
            status_line = b"HTTP/1.1 %d %s" % (status, reason)
            if len(_STATUS_LINES) < 64:
                _STATUS_LINES[status] = (reason, status_line)
        lines = [status_line]
        append = lines.append
        prepared = extensions.get(FIELD_LINES)
        if prepared is not None:
            fields, has_length = prepared
            lines += fields
        else:
            has_length = False
            join = _JOIN
            for pair in response.headers:
                name = pair[0]
                n = len(name)
                if n == 10 or n == 14 or n == 17:
                    low = name.lower()
                    if low == b"content-length":
                        has_length = True
                    elif low == b"transfer-encoding":
                        continue  # we decide the framing ourselves
                    elif low == b"connection":
                        if b"close" in pair[1].lower():
                            keep_alive = False
                        continue
                append(join(pair))  # the pair itself joined: no tuple built
        method = self.method
        no_body = method == "HEAD" or status < 200 or status == 204 or status == 304
        chunked = False
        if type(body) is BufferedBody:  # a whole upstream body: send it with the head
            body = body.data or b""
        elif isinstance(body, (bytearray, memoryview)):
            body = bytes(body)
        if isinstance(body, bytes):
            bodiless_status = status < 200 or status == 204 or status == 304
            if not has_length and not bodiless_status and (body or method != "HEAD"):
                append(b"Content-Length: %d" % len(body))
        elif not has_length and not no_body:
            if self.version == "1.1":
                chunked = True
                append(b"Transfer-Encoding: chunked")
            else:
                keep_alive = False  # HTTP/1.0 without a length: the body ends at close
        if not keep_alive:
            append(b"Connection: close")
        elif self.version != "1.1":
            append(b"Connection: keep-alive")
        probe = b"".join(lines)  # two memchr scans (as in serialize_head)
        if 13 in probe or 10 in probe:
            await _close_body(body)
            log.error("response header contains CR or LF; answering 502 instead")
            await conn.send_error(502, "invalid response header from the handler")
            return False
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        io = conn.io
        timeout = conn.limits.write_timeout
        try:
            if isinstance(body, bytes):
                data = head + body if body and not no_body else head
                if keep_alive and self.complete and io.batch is not None:
                    # Sent with the others at the end of the loop's pass (SendBatch); the
                    # serve loop yields before it reads again, then sends what is left.
                    io.batch.add(io, data)
                else:  # `send_all`, inline for the usual case: the socket takes it all
                    try:
                        sent = io.sock.send(data)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(data):
                        await send_all(io, memoryview(data)[sent:], timeout)
            elif no_body:
                await send_all(io, head, timeout)
            else:
                # Glue the head to the first chunk: one send for a typical small response.
                iterator = body.__aiter__()
                chunk = b""
                while not chunk:
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                if chunk and chunked:
                    await send_all(io, head + b"%x\r\n%b\r\n" % (len(chunk), chunk), timeout)
                else:
                    await send_all(io, head + chunk, timeout)
                async for chunk in iterator:
                    if not chunk:
                        continue
                    data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                    await send_all(io, data, timeout)
                if chunked:
                    await send_all(io, b"0\r\n\r\n", timeout)
        except IO_ERRORS as exc:
            raise client_error(exc, "receiving the response") from None
        except RequestRejected:
            raise
        except Exception:
            log.exception("response body failed for %s", method)
            raise RequestRejected(500, "response body failed") from None
        finally:
            if not isinstance(body, bytes):
                await _close_body(body)
        return keep_alive


class ServerConnection:
    """One server connection: the httptools callbacks that parse its requests into
    `RequestResponseCycle`s, and the task that serves them in order (`serve`)."""

    __slots__ = (
        "began",
        "checkpoint",
        "cur",
        "in_head",
        "info",
        "io",
        "last_host",
        "limits",
        "now",
        "on_head",
        "on_reject",
        "on_tls_error",
        "parser",
        "ready",
        "scheme",
        "stream",
        "tail",
        "tls",
        "upgraded",
        "waited",
    )

    def __init__(
        self,
        stream: ByteStream | None,
        limits: ServerLimits,
        info: ConnectionInfo,
        tls: ssl.SSLContext | None = None,
        on_tls_error: Callable[[ConnectionInfo, BaseException], None] | None = None,
        on_reject: Callable[[ConnectionInfo, int, str], None] | None = None,
        *,
        io: Socket | None = None,
        on_head: Callable[[], None] | None = None,
    ) -> None:
        self.stream = stream
        self.tls = tls
        self.on_tls_error = on_tls_error
        self.on_reject = on_reject
        self.limits = limits
        self.info = info
        self.scheme = "https" if info.ssl_object is not None else "http"
        # Made on the first bytes and dropped while the connection waits between requests
        # (~1 KiB each; making one costs under 1 µs).
        self.parser: httptools.HttpRequestParser | None = None
        self.cur: RequestResponseCycle | None = None
        # A list, not a deque: nearly always empty or one long, and an empty deque keeps a
        # 64-slot block (~0.6 KiB) for as long as the connection lives.
        self.ready: list[RequestResponseCycle] = []
        self.upgraded = False
        self.in_head = False
        # The last bytes read of an unfinished head: its end ("\r\n\r\n") may straddle reads.
        self.tail = b""
        # A request has begun on this connection: until then it waits `header_timeout`, not
        # `idle_timeout` (a connection that sends nothing must not hold a slot for 75 s).
        self.began = False
        self.last_host: tuple[object, tuple[str, int]] = (_NOT_SEEN, ("", 80))
        self.io: Socket = io  # type: ignore[assignment]  # else made in serve()
        # Called once, when the first request head is complete (the sidecar's pending cap).
        self.on_head = on_head
        self.now = anyio.current_time
        self.checkpoint: Callable[[], Awaitable[None]] = anyio.lowlevel.checkpoint
        # The current request went through the scheduler at least once.
        self.waited = True

    # httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        cur = self.cur = _new_object(RequestResponseCycle)
        cur.conn = self
        cur.url = b""
        cur.headers = _new_headers(Headers)
        cur.host = None
        cur.chunks = []
        cur.headers_done = cur.complete = cur.expect = cur.continue_sent = cur.hop_field = False
        cur.keep_alive = True
        cur.body_size = cur.header_bytes = cur.chunk_count = cur.excess = 0
        cur.chunked = False
        self.in_head = self.began = True

    def on_url(self, part: bytes) -> None:
        cur = self.cur
        cur.url += part  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        if len(cur.url) > self.limits.max_request_line:  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
            raise RequestRejected(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The limits are checked once per read (`read_head`) and when the head is complete
        # (`check_head`), not per field: a read adds at most `_READ_SIZE` bytes of fields.
        cur = self.cur
        cur.headers.append((name, value))  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        n = len(name)
        cur.header_bytes += n + len(value) + 4  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        if n == 4 or n == 6:
            low = name.lower()
            if low == b"host":
                if cur.host is not None:  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
                    raise RequestRejected(400, "more than one Host header")  # RFC 9112 §3.2
                cur.host = value  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
            elif low == b"expect" and value.lower() == b"100-continue":
                cur.expect = True  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        elif n == 17:
            if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
                cur.chunked = True  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        elif n == 10 or n == 16:
            cur.hop_field = True  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback

    def check_head(self, cur: RequestResponseCycle) -> None:
        """431 when the head's fields so far are over the limits."""
        limits = self.limits
        if len(cur.headers) > limits.max_header_count:
            raise RequestRejected(431, f"more than {limits.max_header_count} header fields")
        if cur.header_bytes > limits.max_header_bytes:
            raise RequestRejected(431, f"header fields larger than {limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        cur = self.cur
        parser = self.parser
        assert parser is not None
        limits = self.limits
        if (
            len(cur.headers) > limits.max_header_count  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
            or cur.header_bytes > limits.max_header_bytes  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        ):
            self.check_head(cur)  # type: ignore[arg-type]  # cur is set by on_message_begin before any other callback
        cur.method = parser.get_method().decode("ascii")  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        keep_alive = cur.keep_alive = parser.should_keep_alive()  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        # llhttp keeps a request alive without a Connection (or Proxy-Connection) field only
        # when it is HTTP/1.1 (its versions: 0.9, 1.0, 1.1, 2.0): so read the version only
        # otherwise, as `get_http_version` formats a new string each call (2.3 k instructions).
        if keep_alive and not cur.hop_field:  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
            cur.version = "1.1"  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        else:
            cur.version = parser.get_http_version()  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        cur.headers_done = True  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        self.in_head = False
        if self.on_head is not None:
            on_head, self.on_head = self.on_head, None
            on_head()
        max_body = limits.max_body
        if max_body is not None:
            length = cur.headers.get("content-length")  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
            if length is not None and length.isdigit() and int(length) > max_body:
                raise RequestRejected(413, f"request body larger than {max_body} bytes")
        self.ready.append(cur)  # type: ignore[arg-type]  # cur is set by on_message_begin before any other callback

    def on_body(self, body: bytes) -> None:
        cur = self.cur
        cur.chunks.append(body)  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        cur.body_size += len(body)  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
        max_body = self.limits.max_body
        if max_body is not None and cur.body_size > max_body:  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback
            raise RequestRejected(413, f"request body larger than {max_body} bytes")

    def on_chunk_header(self) -> None:
        self.cur.chunk_count += 1  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback

    def on_message_complete(self) -> None:
        self.cur.complete = True  # type: ignore[union-attr]  # cur is set by on_message_begin before any other callback

    # ----------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.upgraded:
            return  # after an Upgrade/CONNECT request nothing more is HTTP/1.1 to us
        cur = self.cur
        in_head = self.in_head
        # A chunked body's non-data is counted read by read (the head has its own limits).
        if cur is None or not cur.chunked or not cur.headers_done or cur.complete:
            counted = None
            body_size = chunk_count = 0
        else:
            counted = cur
            body_size, chunk_count = cur.body_size, cur.chunk_count
        try:
            parser = self.parser
            if parser is None:
                parser = self.parser = httptools.HttpRequestParser(self)
            parser.feed_data(data)
            if counted is not None:
                if counted.complete and self.cur is not counted:
                    return  # the rest began the next request: what of it is whose is unknown
                counted.excess = chunk_excess(
                    counted.excess,
                    len(data),
                    counted.body_size - body_size,
                    counted.chunk_count - chunk_count,
                )
            else:
                new = self.cur
                if self.in_head:
                    self.tail = (self.tail + data)[-3:] if len(data) < 3 else data[-3:]
                    return
                if new is None or not new.chunked:
                    return
                # A chunked body began in this read: what came after its head counts too (up
                # to the end of the read, which is its end when it completed: nothing began).
                after = len(data) - head_end(data, self.tail if in_head and new is cur else b"")
                new.excess = chunk_excess(0, after, new.body_size, new.chunk_count)
                counted = new
            if counted.excess > MAX_CHUNK_EXCESS:
                raise RequestRejected(
                    400, "chunked body with too much non-data (chunk extensions, trailers)"
                )
        except httptools.HttpParserUpgrade:
            self.upgraded = True
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, RequestRejected):
                raise exc.__context__ from None
            raise RequestRejected(400, f"bad request: {exc}") from exc
        except httptools.HttpParserError as exc:
            raise RequestRejected(400, f"bad request: {exc}") from exc

    async def read_head(self) -> bool:
        """Read until a request head is parsed; False when the connection should just end.

        The idle (or header) deadline is computed only before a first wait, so a head that is
        already there costs no clock read; the limit is per wait, no cancel scope.
        """
        limits = self.limits
        io = self.io
        sock = io.sock
        deadline: float | None = None
        # httptools holds a header until its end: bound the bytes a head may take in total.
        max_head = limits.max_request_line + limits.max_header_bytes
        received = 0
        while not self.ready:
            if self.upgraded:
                return False
            try:
                data = recv_now(sock, _READ_SIZE)  # not `recv`: see there
            except OSError:
                return False
            if data is None:
                if deadline is None:
                    waiting_head = self.in_head or not self.began
                    timeout = limits.header_timeout if waiting_head else limits.idle_timeout
                    deadline = _INF if timeout is None else self.now() + timeout
                if not self.in_head:
                    self.parser = None  # between requests: nothing to keep while idle
                try:
                    await io.wait_readable(None if deadline == _INF else deadline - self.now())
                except TimeoutError:
                    if self.in_head:
                        raise RequestRejected(408, _HEAD_TIMEOUT) from None
                    return False  # idle, or silent from the start (as nginx): close quietly
                except IO_ERRORS:
                    return False
                self.waited = True
                continue
            if not data:
                return False
            was_in_head = self.in_head
            self.feed(data)
            received += len(data)
            if self.in_head:
                if received > max_head:
                    raise RequestRejected(431, f"request head larger than {max_head} bytes")
                if self.cur is not None:
                    self.check_head(self.cur)
            if not was_in_head and self.in_head and limits.header_timeout is not None:
                # a head started and is not complete yet: it has header_timeout to arrive
                deadline = self.now() + limits.header_timeout
        return True

    async def send_error(self, status: int, message: str) -> None:
        body = f"{status} {_REASONS[status].decode()}: {message}\n".encode()
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, _REASONS.get(status, b""), len(body))
        )
        try:
            await send_all(self.io, head + body, self.limits.write_timeout or 5.0)
        except IO_ERRORS:
            pass

    async def refuse(self, status: int, message: str) -> None:
        """Answer a request refused before any handler saw it, and tell `on_reject` (what a
        handler raises, it has seen)."""
        if self.on_reject is not None:
            self.on_reject(self.info, status, message)
        await self.send_error(status, message)

    async def send_unsent(self) -> bool:
        """Send what the loop's `SendBatch` could not; False when the client went away."""
        io = self.io
        try:
            await send_all(io, io.take_unsent(), self.limits.write_timeout)
        except IO_ERRORS as exc:
            log.debug("client went away before its response was written: %r", exc)
            return False
        return True

    async def serve(self, handler: Handler) -> None:
        """Serve requests until the connection ends, then close it.

        One coroutine from the task down to the handler call (no helper frames): each time the
        task resumes, every frame of its await chain resumes too, and a proxied request
        resumes it twice (docs/data-path.md).
        """
        io: Socket | None = self.io  # given, or made from the stream here
        try:
            self.now = backend_clock()
            checkpoint = self.checkpoint = backend_checkpoint()
            if io is None:
                assert self.stream is not None
                io = self.io = await socket_for(self.stream)
            if self.tls is not None and not await self.handshake(io):
                return
            if io.pending:  # bytes asyncio's transport had read before the socket was taken
                try:
                    self.feed(io.pending)
                except RequestRejected as exc:
                    await self.refuse(exc.status, str(exc))
                    return
            while True:
                if not self.ready:
                    # Others first: the next request is then nearly always there (99.7 % of
                    # reads behind wrk -c32), which spares a failed `recv` and a wait.
                    await checkpoint()
                    self.waited = True
                    if io.unsent is not None and not await self.send_unsent():
                        return
                    try:
                        if not await self.read_head():
                            return
                    except RequestRejected as exc:
                        await self.refuse(exc.status, str(exc))
                        return
                if not self.waited:
                    # Nothing this request did went through the scheduler (its head was
                    # already there and no call blocked): yield once, so a client that
                    # pipelines requests cannot starve the others, and cancellation is seen.
                    await checkpoint()
                    if io.unsent is not None and not await self.send_unsent():
                        return
                self.waited = False
                cycle = self.ready.pop(0)
                if cycle.host is None and cycle.version == "1.1":
                    await self.refuse(400, "HTTP/1.1 request without Host")
                    return
                try:
                    request = cycle.request()
                except ValueError as exc:
                    await self.refuse(400, str(exc))
                    return
                try:
                    response = await handler(request, self.info)
                except RequestRejected as exc:
                    await self.send_error(exc.status, str(exc))
                    return
                except Exception:
                    log.exception("handler failed for %s %s", cycle.method, request.url)
                    await self.send_error(500, "the handler failed")
                    return
                keep_alive = cycle.keep_alive and not self.upgraded
                if keep_alive and not cycle.complete and cycle.expect and not cycle.continue_sent:
                    keep_alive = False  # the client may or may not send the body now: close
                try:
                    keep_alive = await cycle.respond(response, keep_alive)
                except RequestRejected:
                    return
                if not keep_alive:
                    return
                if not cycle.complete and not await cycle.drain():
                    return
                # An idle connection keeps nothing of the request it answered.
                if self.cur is cycle:
                    self.cur = None
                del cycle, request, response
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            if io is None:
                await close_stream(self.stream)
            else:
                if io.unsent is not None:  # cancelled before sending what the batch left
                    with contextlib.suppress(OSError):
                        io.sock.send(io.take_unsent())
                await io.aclose()

    async def handshake(self, io: Socket) -> bool:
        """Run the server side of the TLS handshake (within `handshake_timeout`); False when
        it failed, which `on_tls_error` hears of (else it is logged)."""
        assert self.tls is not None
        try:
            with anyio.fail_after(self.limits.handshake_timeout):
                ssl_object = await start_tls(io, self.tls, server_side=True)
        except IO_ERRORS as exc:
            if self.on_tls_error is not None:
                self.on_tls_error(self.info, exc)
            else:
                log.info("TLS handshake with %s failed: %r", self.info.client, exc)
            return False
        self.info = dataclasses.replace(self.info, ssl_object=ssl_object)
        self.scheme = "https"
        return True


def _split_host(value: bytes | None, info: ConnectionInfo, scheme: str) -> tuple[str, int | None]:
    if not value:
        local = info.local
        if isinstance(local, tuple):
            return str(local[0]), int(local[1])
        return "localhost", None
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host or (port_text and not port_text.isdigit()) or any(c in host for c in "/ @?#"):
        raise ValueError(f"bad Host header: {text!r}")
    return host, int(port_text) if port_text else None


def serve_connection(
    stream: ByteStream | None,
    handler: Handler,
    *,
    limits: ServerLimits = ServerLimits(),
    info: ConnectionInfo | None = None,
    tls: ssl.SSLContext | None = None,
    on_tls_error: Callable[[ConnectionInfo, BaseException], None] | None = None,
    on_reject: Callable[[ConnectionInfo, int, str], None] | None = None,
    io: Socket | None = None,
    on_head: Callable[[], None] | None = None,
) -> Coroutine[Any, Any, None]:
    """Serve HTTP/1.1 requests on one connection until it ends; closes the stream. Await it.

    `tls`: the server's context; the connection (a plain TCP stream) starts with a TLS
    handshake, and `info.ssl_object` is the handshake's afterwards (prefer this to a stream
    wrapped in TLS beforehand: the engine then drives TLS directly on the socket, see
    docs/data-path.md). `on_tls_error(info, exc)` hears of a failed handshake, and
    `on_reject(info, status, message)` of each answer the engine makes to a request before any
    handler saw it (a malformed or over-limit head: 400, 408, 413, 414, 431).

    An error inside the engine ends the connection and is logged, never raised: one broken
    connection must not take its listener down. (A plain function returning the coroutine,
    so the connection's task resumes one frame less each time.)

    `io` instead of a stream: a connection already in the engine's socket contract (the
    sidecar's listeners accept straight into one, `_loop.Acceptor`); give `info` with it.
    `on_head()` runs once, when the first request head is complete.
    """
    if info is None:
        assert stream is not None, "serve_connection: a stream, or io with info"
        info = ConnectionInfo.from_stream(stream)
    return ServerConnection(
        stream, limits, info, tls, on_tls_error, on_reject, io=io, on_head=on_head
    ).serve(handler)


async def serve_http(
    listener: anyio.abc.Listener[Any],
    handler: Handler,
    *,
    limits: ServerLimits = ServerLimits(),
    task_group: anyio.abc.TaskGroup | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Accept connections from `listener` forever, each served by `serve_connection`
    (over TLS with `tls`, the server's context: give it a plain TCP listener)."""

    def on_connection(stream: ByteStream) -> Coroutine[Any, Any, None]:
        return serve_connection(stream, handler, limits=limits, tls=tls)

    await listener.serve(on_connection, task_group)
