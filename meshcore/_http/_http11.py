"""One client HTTP/1.1 connection: its request's head, its `exchange`, its response's parse.

`exchange` writes the request and reads until the response head is parsed; a body that came
with the head is handed out whole (`BufferedBody`, the connection already back in its pool),
anything longer streams through `ResponseBody`. Every I/O error goes through the error map
(`_error_map.endpoint_error`).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import httptools

from .._endpoints import Endpoint
from .._errors import EndpointProtocolError, ResponseHeadTooLarge
from .._models import Headers, Request, Response
from ._bodies import MAX_CHUNK_EXCESS, BufferedBody, ResponseBody, chunk_excess, head_end
from ._error_map import IO_ERRORS, Phase, endpoint_error
from ._socket import Socket, receive, send_all

_new_headers = Headers.__new__
_new_object = object.__new__

# RFC 9110 §9.2.2: the methods whose intended effect does not change when repeated.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods that carry no body by default: no `Content-Length: 0` for them when the body is empty.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_READ_SIZE = 65536
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
# Bodies up to this size are written in the same send as the head (one syscall).
_GLUE_BODY = 16384
_JOIN = b": ".join
# A request extension: `(pairs, lines, has_host, has_length)`, the header fields already
# serialized as `name: value` lines by whoever applied its header rules in the same pass (the
# sidecar), no Connection or Transfer-Encoding among them, and whether a Host and a
# Content-Length are. `pairs` is a copy of `request.headers` as they were then: the lines are
# written only while the headers still equal it (a layer may change them in between).
REQUEST_LINES = "meshcore.request_lines"


class Owner(Protocol):
    """What a connection needs of its pool (`_pool.Pool`)."""

    checkpoint: Callable[[], Awaitable[None]]
    resends: int

    async def acquire(
        self, connect: float | None, pool: float | None, fresh: bool = False
    ) -> tuple[HTTP11Connection, bool]: ...

    def keep(self, conn: HTTP11Connection) -> bool: ...

    async def finish(self, conn: HTTP11Connection) -> None: ...

    async def discard(self, conn: HTTP11Connection) -> None: ...


class Limits(Protocol):
    """An exchange's time limits (`_connector.Timeouts`)."""

    @property
    def connect(self) -> float | None: ...
    @property
    def read(self) -> float | None: ...
    @property
    def write(self) -> float | None: ...
    @property
    def pool(self) -> float | None: ...


class HTTP11Connection:
    """One HTTP/1.1 connection to an endpoint, and the httptools callbacks that parse its
    responses (one at a time: `start` before each)."""

    __slots__ = (
        "began",
        "body_size",
        "chunk_count",
        "chunked",
        "chunks",
        "close_delimited",
        "complete",
        "ended",
        "endpoint",
        "excess",
        "framed",
        "got_bytes",
        "head",
        "headers",
        "headers_done",
        "idle_since",
        "interim",
        "io",
        "keep_alive",
        "max_header_bytes",
        "max_header_count",
        "only",
        "parser",
        "pool",
        "reason",
        "sock",
        "status",
        "tail",
    )

    def __init__(
        self,
        io: Socket,
        endpoint: Endpoint,
        pool: Owner,
        max_header_count: int = 100,
        max_header_bytes: int = 61440,
    ) -> None:
        self.io = io
        self.max_header_count = max_header_count
        self.max_header_bytes = max_header_bytes
        self.sock = io.sock
        self.endpoint = endpoint
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.chunks: list[bytes] = []
        # The last bytes read of an unfinished head: its end may straddle two reads.
        self.tail = b""
        # Responses the parser began and completed on this connection, and which one (the
        # `began` count) an exchange's response is when that tells its version (see `feed`).
        self.began = self.ended = 0
        self.only = -1

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
        self.only = -1
        self.body_size = self.chunk_count = self.excess = 0
        self.chunked = False

    # httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.began += 1

    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        # The limits are checked per read and when the head is complete, not per field: the
        # count in `feed` and `on_headers_complete`, the bytes in `exchange` (only once the
        # reads passed the limit can the fields have: a read adds at most `_READ_SIZE`).
        self.headers.append((name, value))
        n = len(name)
        if n == 14 or n == 17:
            low = name.lower()
            if low == b"content-length" or low == b"transfer-encoding":
                self.framed = True
                if n == 17 and b"chunked" in value.lower():
                    self.chunked = True

    def fields_size(self) -> int:
        """The bytes of the head's fields so far (name, value, ": " and CRLF each)."""
        return sum(len(name) + len(value) + 4 for name, value in self.headers)

    def head_too_large(self) -> ResponseHeadTooLarge:
        return ResponseHeadTooLarge(
            f"response head from {self.endpoint.id} exceeds the limits "
            f"({self.max_header_count} header fields, {self.max_header_bytes} bytes)",
            endpoint=self.endpoint,
        )

    def on_headers_complete(self) -> None:
        if len(self.headers) > self.max_header_count:
            raise self.head_too_large()
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
            self.body_size += len(body)

    def on_chunk_header(self) -> None:
        self.chunk_count += 1

    def on_message_complete(self) -> None:
        self.ended += 1
        if self.interim:  # the real response's head starts afresh
            self.interim = self.framed = False
            self.headers = _new_headers(Headers)
            return
        if not self.complete:
            self.complete = True
            self.keep_alive = self.keep_alive and self.parser.should_keep_alive()

    def feed(self, data: bytes) -> None:
        began_before = self.got_bytes
        if not began_before:
            self.got_bytes = True
            # A parser between messages whose first read starts with this status line: if the
            # response is the one message begun from here (no 1xx before it), it is HTTP/1.1,
            # and `get_http_version` (a new string each call, 2.3 k instructions) is not read.
            # (A slice compared, not `startswith`: that parses its arguments, 265 instructions.)
            if self.began == self.ended and data[:9] == b"HTTP/1.1 ":
                self.only = self.began + 1
        # A chunked body's non-data is counted read by read (the head has its own limits).
        counting = self.chunked and self.headers_done and not self.complete
        body_size, chunk_count = self.body_size, self.chunk_count
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
        if counting:
            read = len(data)
        elif self.chunked and self.headers_done:
            # The head ended in this read: what came after it counts too.
            read = len(data) - head_end(data, self.tail if began_before else b"")
        else:
            if not self.headers_done:  # its end may straddle this read and the next
                self.tail = (self.tail + data)[-3:] if len(data) < 3 and began_before else data[-3:]
                if len(self.headers) > self.max_header_count:
                    raise self.head_too_large()
            return
        self.excess = chunk_excess(
            self.excess, read, self.body_size - body_size, self.chunk_count - chunk_count
        )
        if self.excess > MAX_CHUNK_EXCESS:
            raise EndpointProtocolError(
                f"chunked response body from {self.endpoint.id} with too much non-data "
                "(chunk extensions, trailers)",
                endpoint=self.endpoint,
            )

    # I/O -----------------------------------------------------------------------------------
    def peer_closed(self) -> bool:
        """True when the idle connection has data or EOF pending: the server gave up on it."""
        try:
            self.sock.recv(1, _PEEK_FLAGS)  # b"" (EOF) or stray bytes: either way, unusable
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    async def exchange(
        self,
        request: Request,
        head: bytes,
        body: Any,
        chunked: bool,
        close: bool,
        timeouts: Limits,
        reused: bool,
    ) -> Response:
        """Send `request` (its `head` and `body` from `serialize_head`) and read the response
        head; the limits are per wait, so "between two reads/writes" holds.

        The stale keep-alive race is settled here (RFC 9112 §9.3.1): when a `reused`
        connection fails before any byte of the response came, an idempotent request with its
        body held in full is resent once on a fresh connection (`resend`); anything else
        raises with `replayable=True`. Here rather than in the connector, so a request awaits
        one frame less (`HTTPConnector.send`)."""
        self.start(request.method == "HEAD")
        io = self.io
        sock = self.sock
        write_timeout = timeouts.write
        read_timeout = timeouts.read
        phase: Phase = "write"
        stale_resend = False
        try:
            if isinstance(body, bytes):
                if len(body) <= _GLUE_BODY:
                    data = head + body if body else head
                    if io.batch is not None:
                        # Sent with the others at the end of the loop's pass (SendBatch); we
                        # yield below before reading.
                        io.batch.add(io, data)
                    else:
                        try:  # the usual case inline: the socket takes it all at once
                            sent = sock.send(data)
                        except BlockingIOError:
                            sent = 0
                        if sent < len(data):
                            await send_all(self.io, memoryview(data)[sent:], write_timeout)
                else:
                    await send_all(self.io, head, write_timeout)
                    await send_all(self.io, body, write_timeout)
            else:
                await send_all(self.io, head, write_timeout)
                await self.send_streamed(body, chunked, request, write_timeout)
            # Others first (as trio's own send would have let them): the answer is then often
            # there already, which spares a failed recv and a wait.
            await self.pool.checkpoint()
            if io.unsent is not None:
                await send_all(self.io, io.take_unsent(), write_timeout)
            phase = "read"
            feed = self.feed
            received = 0
            while not self.headers_done:
                try:  # inline as well
                    data = sock.recv(_READ_SIZE)
                except BlockingIOError:
                    data = None
                if data is None:
                    # Straight to the wait, not through `receive`, whose first recv would fail
                    # again (docs/data-path.md, "Fifth pass"). A limit costs something only
                    # when the read has to wait.
                    await io.wait_readable(read_timeout)
                    continue
                if not data:
                    raise anyio.EndOfStream
                received += len(data)
                feed(data)
                if received > self.max_header_bytes and (
                    # httptools holds a header until its end: this bounds one huge header too
                    # (and what the head buffers); a head that ended is measured field by field.
                    self.fields_size() > self.max_header_bytes or not self.headers_done
                ):
                    raise self.head_too_large()
        except BaseException as exc:
            await self.pool.discard(self)
            if not isinstance(exc, IO_ERRORS):
                raise
            stale = reused and not self.got_bytes and not isinstance(exc, TimeoutError)
            if not (stale and request.method in _IDEMPOTENT and isinstance(body, bytes)):
                limit = write_timeout if phase == "write" else read_timeout
                raise endpoint_error(exc, self.endpoint, phase, limit, stale=stale) from exc
            stale_resend = True
        if stale_resend:
            return await self.resend(request, head, body, chunked, close, timeouts)
        if close:  # `Connection: close` from our side ends reuse too
            self.keep_alive = False

        if self.only == self.began:
            version = b"HTTP/1.1"
        else:
            version = b"HTTP/1.1" if self.parser.get_http_version() == "1.1" else b"HTTP/1.0"
        extensions = {
            "http_version": version,
            "reason_phrase": self.reason,
        }
        if self.complete:
            # The whole body came with the head (most small responses): give the connection
            # back now and hand out the bytes. Take what the response needs first: once given
            # back (`finish` may yield), another task may start an exchange on this connection.
            chunks = self.chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.chunks = []
            status, headers = self.status, self.headers
            pool = self.pool
            if not pool.keep(self):  # the usual case without a coroutine
                await pool.finish(self)
            # Built without their __init__ (the fields are what it would set): the proxy's
            # hot path (docs/data-path.md).
            buffered = _new_object(BufferedBody)
            buffered.data = data
            response = _new_object(Response)
            response.status_code = status
            response.headers = headers
            response.stream = buffered
            response.extensions = extensions
            return response
        return Response(self.status, self.headers, ResponseBody(self, read_timeout), extensions)

    async def resend(
        self, request: Request, head: bytes, body: Any, chunked: bool, close: bool,
        timeouts: Limits,
    ) -> Response:
        """Send the request again on a fresh connection of the same pool (see `exchange`)."""
        pool = self.pool
        pool.resends += 1
        conn, _ = await pool.acquire(timeouts.connect, timeouts.pool, fresh=True)
        return await conn.exchange(request, head, body, chunked, close, timeouts, False)

    async def send_streamed(
        self, body: Any, chunked: bool, request: Request, write_timeout: float | None
    ) -> None:
        """Write a streamed body; the write timeout applies to each wait, not the upload."""
        io = self.io
        if chunked:
            async for chunk in body:
                if chunk:
                    await send_all(io, b"%x\r\n%b\r\n" % (len(chunk), chunk), write_timeout)
            await send_all(io, b"0\r\n\r\n", write_timeout)
            return
        declared = int(request.headers.get("content-length") or 0)
        sent = 0
        async for chunk in body:
            if chunk:
                sent += len(chunk)
                if sent > declared:
                    break
                await send_all(io, chunk, write_timeout)
        if sent != declared:
            raise EndpointProtocolError(
                f"request body is {'longer' if sent > declared else 'shorter'} than its "
                f"Content-Length ({declared})",
                endpoint=self.endpoint,
            )

    # the streamed response body (`ResponseBody`) ---------------------------------------------
    async def receive_body(self, timeout: float | None) -> None:
        """Read more of the response body into `chunks` (or learn that it ended)."""
        try:
            data = await receive(self.io, _READ_SIZE, timeout)
        except IO_ERRORS as exc:
            raise endpoint_error(exc, self.endpoint, "body", timeout) from exc
        if data:
            self.feed(data)
        elif self.close_delimited:
            self.complete = True
        else:
            raise endpoint_error(anyio.EndOfStream(), self.endpoint, "body", timeout)

    async def finish(self) -> None:
        await self.pool.finish(self)

    async def discard(self) -> None:
        await self.pool.discard(self)


def serialize_head(request: Request) -> tuple[bytes, Any, bool, bool]:
    """The request head as bytes, the body to send, whether it goes chunked, and whether the
    request says `Connection: close` (the connection is not reused after it)."""
    method = request.method
    url = request.url
    body = request.stream
    has_host = has_length = has_te = close = False
    lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"), url.target.encode("latin-1"))]
    append = lines.append
    fields: Any = request.headers
    prepared = request.extensions.get(REQUEST_LINES)
    if prepared is not None and prepared[0] == fields:  # serialized with the header rules
        lines += prepared[1]
        has_host, has_length = prepared[2], prepared[3]
        fields = ()
    join = _JOIN
    for pair in fields:
        name = pair[0]
        n = len(name)
        if n == 4 or n == 10 or n == 14 or n == 17:
            low = name.lower()
            if low == b"host":
                has_host = True
            elif low == b"content-length":
                has_length = True
            elif low == b"transfer-encoding":
                has_te = True
            elif low == b"connection" and b"close" in pair[1].lower():
                close = True
        # The pair itself joined (no tuple built; two `+` would build an intermediate bytes
        # and take both buffers twice): 1.5 k instructions less for 5 fields than before.
        append(join(pair))
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
    # Two memchr scans of the lines without their separators, not one scan per header: a CR
    # or LF inside a name or value would let a caller smuggle a header or a second request
    # (RFC 9110 §5.5). An int operand: `b"\r" in` would first fail to read it as one, raising
    # and clearing a TypeError inside; and bytes.count walks byte by byte, three times slower.
    probe = b"".join(lines)
    if 13 in probe or 10 in probe:
        raise EndpointProtocolError("CR or LF inside a request header or target")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head, body, chunked, close
