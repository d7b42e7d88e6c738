"""Property tests of the httptools glue: however the bytes are split across reads, the engine
sees the same heads and bodies (chunked and content-length framing, both directions).

These exercise the parser callbacks directly (no I/O), so they are plain synchronous tests.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore._endpoints import Endpoint
from meshcore._errors import EndpointProtocolError
from meshcore._http._http11 import HTTP11Connection
from meshcore._http._server import ConnectionInfo, RequestRejected, ServerConnection, ServerLimits
from meshcore._http._socket import adapt


class _NoStream:
    """Enough of a ByteStream for the parser glue, which never touches I/O."""

    def extra(self, attribute: Any, default: Any = None) -> Any:
        return default

    async def receive(self, max_bytes: int = 65536) -> bytes:  # pragma: no cover
        raise AssertionError("no I/O here")

    async def send(self, data: bytes) -> None:  # pragma: no cover
        raise AssertionError("no I/O here")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, i = b"", 0
    for size in sizes:
        if i >= len(body):
            break
        piece = body[i : i + size]
        i += len(piece)
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    if i < len(body):
        out += b"%X;ext=1\r\n%s\r\n" % (len(body) - i, body[i:])
    return out + b"0\r\n\r\n"


header_names = st.from_regex(rb"\AX-[A-Za-z0-9-]{1,20}\Z", fullmatch=True)
header_values = st.from_regex(rb"\A[!-~]([ !-~]{0,40}[!-~])?\Z", fullmatch=True)
headers_st = st.lists(st.tuples(header_names, header_values), max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), max_size=10),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    headers=headers_st,
    use_chunked=st.booleans(),
)
def test_response_glue_any_split(
    body: bytes,
    sizes: list[int],
    cuts: list[int],
    headers: list[tuple[bytes, bytes]],
    use_chunked: bool,
) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    if use_chunked:
        wire = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)
    else:
        wire = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    conn = HTTP11Connection(adapt(_NoStream()), Endpoint("127.0.0.1", 1), None)  # type: ignore[arg-type]
    for _ in range(2):  # the same connection parses a second response after the first
        conn.start(False)
        for piece in split(wire, cuts):
            assert not conn.complete
            conn.feed(piece)
        assert conn.headers_done and conn.complete and conn.keep_alive
        assert conn.status == 200
        assert list(conn.headers)[: len(headers)] == headers
        assert b"".join(conn.chunks) == body


@settings(max_examples=200, deadline=None)
@given(
    size_text=st.from_regex(
        rb"\A[0-9a-fA-F]{0,3}[g-zG-Z;\-\x00 ]?[0-9a-fA-F]{0,2}\Z", fullmatch=True
    ),
)
def test_bad_chunk_sizes_are_protocol_errors(size_text: bytes) -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + size_text
        + b"\r\nabc\r\n0\r\n\r\n"
    )
    conn = HTTP11Connection(adapt(_NoStream()), Endpoint("127.0.0.1", 1), None)  # type: ignore[arg-type]
    conn.start(False)
    try:
        conn.feed(wire)
    except EndpointProtocolError:
        return
    # accepted: then it was a valid size and the body is what the size said
    if conn.complete:
        assert all(len(c) <= 0xFFFFF for c in conn.chunks)


@settings(max_examples=150, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=500), min_size=1, max_size=4),
    sizes=st.lists(st.integers(1, 200), max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    headers=headers_st,
    chunked_flags=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_pipelined_requests_glue_any_split(
    bodies: list[bytes],
    sizes: list[int],
    cuts: list[int],
    headers: list[tuple[bytes, bytes]],
    chunked_flags: list[bool],
) -> None:
    wire = b""
    for i, body in enumerate(bodies):
        head = b"POST /r%d HTTP/1.1\r\nHost: h\r\n" % i + b"".join(
            k + b": " + v + b"\r\n" for k, v in headers
        )
        if chunked_flags[i]:
            wire += head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)
        else:
            wire += head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    conn = ServerConnection(_NoStream(), ServerLimits(), ConnectionInfo())  # type: ignore[arg-type]
    for piece in split(wire, cuts):
        conn.feed(piece)
    assert len(conn.ready) == len(bodies)
    for i, (msg, body) in enumerate(zip(conn.ready, bodies)):
        assert msg.method == "POST" and msg.url == b"/r%d" % i and msg.host == b"h"
        assert list(msg.headers)[1 : 1 + len(headers)] == headers
        assert msg.complete and b"".join(msg.chunks) == body


@settings(max_examples=100, deadline=None)
@given(count=st.integers(0, 40), value_size=st.integers(0, 300))
def test_header_limits(count: int, value_size: int) -> None:
    limits = ServerLimits(max_header_count=20, max_header_bytes=2000)
    conn = ServerConnection(_NoStream(), limits, ConnectionInfo())  # type: ignore[arg-type]
    wire = (
        b"GET / HTTP/1.1\r\nHost: h\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * value_size) for i in range(count))
        + b"\r\n"
    )
    total = sum(len(b"X-%d" % i) + value_size + 4 for i in range(count)) + len(b"Host") + 1 + 4
    too_many = count + 1 > 20
    too_big = total > 2000
    if too_many or too_big:
        with pytest.raises(RequestRejected) as info:
            conn.feed(wire)
        assert info.value.status == 431
    else:
        conn.feed(wire)
        assert len(conn.ready) == 1


_VERSIONS = ["0.9", "1.0", "1.1", "2.0"]  # what llhttp accepts in a request line
_CONNECTION_FIELDS = [
    b"",
    b"Connection: keep-alive\r\n",
    b"Connection: close\r\n",
    b"connection: Keep-Alive, X-A\r\n",
    b"Proxy-Connection: keep-alive\r\n",
    b"Proxy-Connection: close\r\n",
    b"User-Agent: t\r\n",  # as long as Connection, but not one
]


@settings(max_examples=200, deadline=None)
@given(
    heads=st.lists(
        st.tuples(st.sampled_from(_VERSIONS), st.sampled_from(_CONNECTION_FIELDS), headers_st),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_request_version_as_llhttp_reads_it(
    heads: list[tuple[str, bytes, list[tuple[bytes, bytes]]]], cuts: list[int]
) -> None:
    """The version the server reads (from `should_keep_alive()` when that tells it) is the
    parser's `get_http_version()`, request by request, pipelined and split anyhow."""
    import httptools

    wire = b""
    for version, connection, headers in heads:
        wire += (
            b"GET / HTTP/%s\r\nHost: h\r\n" % version.encode()
            + connection
            + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
            + b"\r\n"
        )
    seen: list[str] = []

    class Watched(ServerConnection):
        def on_headers_complete(self) -> None:
            assert isinstance(self.parser, httptools.HttpRequestParser)
            seen.append(self.parser.get_http_version())
            super().on_headers_complete()

    conn = Watched(_NoStream(), ServerLimits(), ConnectionInfo())  # type: ignore[arg-type]
    try:
        for piece in split(wire, cuts):
            conn.feed(piece)
    except RequestRejected:  # llhttp refuses bytes after a request it does not keep alive
        assert not conn.ready[-1].keep_alive
    assert seen and [cycle.version for cycle in conn.ready] == seen
    assert seen == [v for v, _, _ in heads][: len(seen)]


_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.0 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",  # llhttp skips empty lines first
    b"\r\nHTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
]
_STRAY = [b"", b"HTTP/1.0 200 OK\r\nX: ", b"HTTP/1.0 200 ", b"HTTP/1.", b"\r\n"]


@settings(max_examples=300, deadline=None)
@given(
    exchanges=st.lists(
        st.tuples(st.sampled_from(_RESPONSES), st.sampled_from(_STRAY)), min_size=1, max_size=5
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_response_version_as_llhttp_reads_it(
    exchanges: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    """`exchange` calls a response HTTP/1.1 without asking the parser (`only == began`: the
    one response begun since a first read that starts with `HTTP/1.1 `) only when the parser
    says so too: after 1xx responses, empty lines, and bytes a server sent after a response
    that the parser carries into the next exchange."""
    conn = HTTP11Connection(adapt(_NoStream()), Endpoint("127.0.0.1", 1), None)  # type: ignore[arg-type]
    for response, stray in exchanges:
        conn.start(False)
        try:
            for piece in split(response + stray, cuts):
                conn.feed(piece)
        except EndpointProtocolError:
            return  # the carried bytes made it unparseable: the connection is dropped
        if not conn.headers_done:
            return
        if conn.only == conn.began:
            assert conn.parser.get_http_version() == "1.1"


def test_response_version_read_without_the_parser_in_the_usual_case() -> None:
    conn = HTTP11Connection(adapt(_NoStream()), Endpoint("127.0.0.1", 1), None)  # type: ignore[arg-type]
    for response, inferred in [(_RESPONSES[0], True), (_RESPONSES[1], False),
                               (_RESPONSES[0], True), (_RESPONSES[2], False)]:
        conn.start(False)
        conn.feed(response)
        assert conn.complete and (conn.only == conn.began) is inferred
