"""The server side driven by independent clients: curl and raw blocking sockets in a thread."""

from __future__ import annotations

import dataclasses
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from meshcore._endpoints import Endpoint
from meshcore._http import ConnectionInfo, HTTPConnector, ServerLimits, serve_http
from meshcore._models import Request, Response

pytestmark = pytest.mark.anyio

LIMITS = ServerLimits(
    max_request_line=1024,
    max_header_count=20,
    max_header_bytes=4096,
    max_body=100_000,
    header_timeout=0.5,
    idle_timeout=5.0,
    body_timeout=0.5,
)


BIG = bytes(range(256)) * 16384  # 4 MiB


async def app(request: Request, conn: ConnectionInfo) -> Response:
    path = request.url.path
    if path == "/echo":
        body = await request.aread()
        return Response(200, [("X-Len", str(len(body)))], body)
    if path == "/info":
        text = (
            f"{request.method} {request.url} client={conn.client[0]} tls={conn.tls} "
            f"version={request.extensions['http_version'].decode()}"
        )
        return Response(200, [("Content-Type", "text/plain")], text.encode())
    if path == "/stream":

        async def gen() -> AsyncIterator[bytes]:
            for i in range(3):
                yield b"chunk%d\n" % i
                await anyio.lowlevel.checkpoint()

        return Response(200, [], gen())
    if path == "/upper":  # streams the request body back, transformed, without buffering

        async def upper() -> AsyncIterator[bytes]:
            async for chunk in request.stream:  # type: ignore[union-attr]
                yield chunk.upper()

        return Response(200, [], upper())
    if path == "/ignore-body":
        return Response(200, [], b"ignored")
    if path == "/boom":
        raise RuntimeError("handler bug")
    if path == "/204":
        return Response(204)
    if path == "/crlf":  # a handler bug: a CR or LF in a response header field
        field = {
            "cr-value": ("X-A", "1\rX-B: 2"), "lf-value": ("X-A", "1\nX-B: 2"),
            "crlf-value": ("X-A", "1\r\nX-B: 2"), "lf-name": ("X-A\nX-B", "1"),
        }[request.url.query]
        return Response(200, [field], b"smuggled?")
    if path == "/reason":  # the handler's own reason phrase
        return Response(200, [], b"r", {"reason_phrase": request.url.query.encode()})
    if path == "/big":  # more than one send takes through a small receive window
        return Response(200, [], BIG)
    return Response(200, [], f"{request.method} {request.url.target}".encode())


class Wrapped(anyio.abc.ByteStream):
    """A TCP stream the engine cannot take the socket of: it goes through `StreamSocket`."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.inner = stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self):  # type: ignore[no-untyped-def]
        return self.inner.extra_attributes


class WrappingListener(anyio.abc.Listener[anyio.abc.ByteStream]):
    def __init__(self, inner: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        self.inner = inner

    async def serve(self, handler, task_group=None) -> None:  # type: ignore[no-untyped-def,override]
        await self.inner.serve(lambda stream: handler(Wrapped(stream)), task_group)

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self):  # type: ignore[no-untyped-def]
        return self.inner.extra_attributes


@pytest.fixture(params=["socket", "stream"])
async def server(anyio_backend: str, request: pytest.FixtureRequest) -> AsyncIterator[int]:
    """Every server test runs twice: on the socket the engine takes from the event loop, and
    on a stream it cannot take (the stream adapter), so both follow the one I/O path."""
    listener: anyio.abc.Listener[anyio.abc.ByteStream] = await anyio.create_tcp_listener(
        local_host="127.0.0.1"
    )
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    if request.param == "stream":
        listener = WrappingListener(listener)  # type: ignore[arg-type]
    marker = request.node.get_closest_marker("server_limits")
    limits = dataclasses.replace(LIMITS, **marker.kwargs) if marker else LIMITS
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_http(listener, app, limits=limits))
        yield port
        tg.cancel_scope.cancel()


def raw_exchange(port: int, data: bytes | list[bytes], pause: float = 0.0) -> bytes:
    """Send `data` (a list is sent piece by piece), then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for piece in data if isinstance(data, list) else [data]:
            try:
                s.sendall(piece)
            except OSError:  # the server answered and closed early: read what it said
                break
            if pause:
                time.sleep(pause)
        s.shutdown(socket.SHUT_WR) if not isinstance(data, list) else None
        out = b""
        while True:
            try:
                got = s.recv(65536)
            except ConnectionResetError:
                break
            if not got:
                break
            out += got
        return out


async def raw(port: int, data: bytes | list[bytes], pause: float = 0.0) -> bytes:
    return await anyio.to_thread.run_sync(raw_exchange, port, data, pause)


async def still_up(port: int) -> None:
    out = await raw(port, b"GET /alive HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"GET /alive")


# curl ---------------------------------------------------------------------------------------

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl not installed")


async def curl(*args: str) -> tuple[str, str]:
    result = await anyio.run_process([CURL, "-sS", "--max-time", "5", *args], check=False)  # type: ignore[list-item]
    return result.stdout.decode(), result.stderr.decode()


@needs_curl
async def test_curl_get_keepalive_and_info(server: int) -> None:
    base = f"http://127.0.0.1:{server}"
    out, err = await curl("-v", f"{base}/info?q=1", f"{base}/a", f"{base}/stream")
    assert (
        f"GET http://127.0.0.1:{server}/info?q=1 client=127.0.0.1 tls=False version=HTTP/1.1" in out
    )
    assert "GET /a" in out and "chunk0\nchunk1\nchunk2\n" in out
    assert "Re-using existing connection" in err or "Reusing existing connection" in err


@needs_curl
async def test_curl_post_bodies(server: int) -> None:
    base = f"http://127.0.0.1:{server}"
    out, _ = await curl("--data-binary", "x" * 5000, f"{base}/echo")
    assert out == "x" * 5000
    out, _ = await curl(
        "-H", "Transfer-Encoding: chunked", "--data-binary", "abc" * 100, f"{base}/upper"
    )
    assert out == "ABC" * 100
    out, err = await curl(
        "-v", "-H", "Expect: 100-continue", "--data-binary", "y" * 2000, f"{base}/echo"
    )
    assert out == "y" * 2000 and "100 Continue" in err


@needs_curl
async def test_curl_head_and_204(server: int) -> None:
    base = f"http://127.0.0.1:{server}"
    out, _ = await curl("-I", f"{base}/x")
    assert out.startswith("HTTP/1.1 200 OK") and "Content-Length: 7" in out  # len("HEAD /x")
    out, _ = await curl("-i", f"{base}/204")
    assert out.startswith("HTTP/1.1 204 No Content") and "Content-Length" not in out


@needs_curl
async def test_curl_body_too_large(server: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "big").write_bytes(b"z" * 200_000)
    out, _ = await curl(
        "-i", "--data-binary", f"@{tmp_path / 'big'}", f"http://127.0.0.1:{server}/echo"
    )
    assert out.startswith("HTTP/1.1 413 ")
    await still_up(server)


# raw sockets: bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(30))
            + b"\r\n",
            431,
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n", 413),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
        ),
        (b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n", 500),
    ],
    ids=[
        "garbage",
        "version",
        "long-target",
        "header-count",
        "header-size",
        "no-host",
        "two-hosts",
        "bad-chunk-size",
        "content-length-too-large",
        "conflicting-length",
        "handler-error",
    ],
)
async def test_bad_input_answered_and_closed(
    server: int, request_bytes: bytes, status: int
) -> None:
    out = await raw(server, request_bytes)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert b"Connection: close\r\n" in out
    await still_up(server)


# Sixty-nine sends a millisecond apart can outlast the usual 0.5 s on a loaded machine.
@pytest.mark.server_limits(header_timeout=10.0)
async def test_slow_byte_by_byte_client(server: int) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    out = await raw(server, [bytes([b]) for b in request], pause=0.001)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nhello")


async def test_header_timeout_answers_408(server: int) -> None:
    start = time.monotonic()
    out = await raw(server, [b"GET / HTTP/1.1\r\nHost: x\r\n"])  # never finishes the head
    assert out.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - start < 3
    await still_up(server)


async def test_one_endless_header_answers_431_not_408(server: int) -> None:
    """httptools holds a header until its end: a header that never ends is refused once the
    head passes max_request_line + max_header_bytes (5 KiB here), not buffered until 408."""
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "
    out = await raw(server, [head] + [b"a" * 65536] * 16)
    assert out.startswith(b"HTTP/1.1 431 ") and b"request head larger than 5120 bytes" in out
    await still_up(server)


def wait_closed(port: int) -> tuple[bytes, float]:
    """Connect, send nothing, and wait (at most 5 s) for the server to close: what it sent and
    how long it took."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            out = s.recv(65536)
        except ConnectionResetError:
            out = b""
    return out, time.monotonic() - start


async def test_silent_connection_closed_at_header_timeout(server: int) -> None:
    """A connection that never sends a byte is closed at `header_timeout` (0.5 s here), not
    held for `idle_timeout` (5 s here); quietly, as nginx does."""
    out, elapsed = await anyio.to_thread.run_sync(wait_closed, server)
    assert out == b""
    assert LIMITS.header_timeout <= elapsed + 0.05 and elapsed < 3  # type: ignore[operator]
    await still_up(server)


async def test_slowloris_trickle_still_times_out(server: int) -> None:
    # A byte every 0.1 s keeps the connection busy but the head must be complete within 0.5 s.
    pieces = [b"GET / HTTP/1.1\r\n"] + [b"X" for _ in range(30)]
    out = await raw(server, pieces, pause=0.1)
    assert out.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("which", ["cr-value", "lf-value", "crlf-value", "lf-name"])
async def test_response_header_with_cr_or_lf_answers_502(server: int, which: str) -> None:
    out = await raw(server, b"GET /crlf?%s HTTP/1.1\r\nHost: x\r\n\r\n" % which.encode())
    assert out.startswith(b"HTTP/1.1 502 ") and b"X-B" not in out and b"smuggled" not in out
    await still_up(server)


async def test_each_response_gets_its_own_reason_phrase(server: int) -> None:
    """Status lines are remembered per status (not formatted each time): a new reason for the
    same status still goes out as given."""
    out = await raw(server, [b"".join(
        b"GET /reason?%s HTTP/1.1\r\nHost: x\r\n\r\n" % r for r in (b"Fine", b"Fine", b"Good")
    ) + b"GET /one HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
    lines = re.findall(rb"HTTP/1\.1 \d+ \w+", out)
    assert lines == [b"HTTP/1.1 200 Fine", b"HTTP/1.1 200 Fine", b"HTTP/1.1 200 Good", b"HTTP/1.1 200 OK"]


async def test_pipelined_requests_answered_in_order(server: int) -> None:
    reqs = (
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    out = await raw(server, [reqs])
    assert out.count(b"HTTP/1.1 200 OK") == 4
    i1, i2, i3, i4 = (out.index(x) for x in (b"GET /one", b"abc", b"chunk2", b"GET /three"))
    assert i1 < i2 < i3 < i4
    assert b"Transfer-Encoding: chunked\r\n\r\n7\r\nchunk0\n\r\n" in out


async def test_large_response_then_keepalive(server: int) -> None:
    """A response the socket does not take at once (on asyncio, what the loop's SendBatch
    leaves for the connection to send), then the next request on the same connection."""

    def go() -> bytes:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            s.settimeout(5)
            s.connect(("127.0.0.1", server))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            s.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out = b""
            while got := s.recv(65536):
                out += got
            return out

    out = await anyio.to_thread.run_sync(go)
    head, rest = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: %d" % len(BIG) in head
    assert rest[: len(BIG)] == BIG
    assert rest[len(BIG) :].startswith(b"HTTP/1.1 200 OK") and out.endswith(b"GET /after")


async def test_unread_body_is_drained_for_keepalive(server: int) -> None:
    reqs = (
        b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
        b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    out = await raw(server, [reqs])
    assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"GET /next")


async def test_http10_request(server: int) -> None:
    out = await raw(server, b"GET /old HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out
    out = await raw(server, [b"GET /stream HTTP/1.0\r\n\r\n"])
    assert b"chunk0\nchunk1\nchunk2\n" in out and b"chunked" not in out


@pytest.mark.parametrize(
    "partial",
    [
        b"GET / HT",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-some",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ],
    ids=["mid-request-line", "mid-body", "mid-chunk"],
)
async def test_early_disconnect(server: int, partial: bytes) -> None:
    def go() -> None:
        with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
            s.sendall(partial)

    await anyio.to_thread.run_sync(go)
    await still_up(server)


# our own client against our own server ------------------------------------------------------


async def test_connector_round_trip_streaming(server: int) -> None:
    endpoint = Endpoint("127.0.0.1", server)

    async def body() -> AsyncIterator[bytes]:
        for i in range(100):
            yield b"piece %d " % i

    async with HTTPConnector() as connector:
        response = await connector.send(
            endpoint, Request("POST", f"http://127.0.0.1:{server}/upper", stream=body())
        )
        assert response.headers.get("transfer-encoding") == "chunked"
        assert await response.aread() == b"".join(b"PIECE %d " % i for i in range(100))
        for _ in range(3):
            response = await connector.send(
                endpoint, Request("GET", f"http://127.0.0.1:{server}/k")
            )
            assert await response.aread() == b"GET /k"
        assert connector.stats()[endpoint.id]["open"] == 1


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")]
)
async def test_uvloop_smoke(nginx) -> None:  # type: ignore[no-untyped-def]
    """Server and client on uvloop: a proxy hop from our server through our client to nginx."""
    pytest.importorskip("uvloop")
    upstream = Endpoint("127.0.0.1", nginx.port)

    async with HTTPConnector() as connector:

        async def proxy(request: Request, conn: ConnectionInfo) -> Response:
            response = await connector.send(
                upstream, Request("GET", f"{nginx.base}{request.url.target}")
            )
            length = response.headers.get("content-length")
            return Response(response.status_code, [("Content-Length", length)], response.stream)

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: serve_http(listener, proxy))
            for path, expected in (("/", b"hello from nginx\n"), ("/files/big.bin", nginx.big)):
                out = await raw(
                    port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                )
                assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(expected)
            tg.cancel_scope.cancel()


# chunk extensions: Go's allowance, 16 bytes per chunk + twice its data, 16 KiB beyond -------

CHUNKED_POST = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"


async def test_chunk_extensions_within_the_allowance_pass(server: int) -> None:
    ext = b";name=" + b"v" * 94  # a 100-byte extension on each 1 KiB chunk
    body = b"".join(b"400%b\r\n%b\r\n" % (ext, b"d" * 1024) for _ in range(64)) + b"0\r\n\r\n"
    out = await raw(server, [CHUNKED_POST, body])
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Len: 65536\r\n" in out


@pytest.mark.parametrize(
    "body",
    [
        [b"1;"] + [b"e" * 65536] * 32,  # 2 MiB of one chunk's extension
        [b"".join(b"1;%b\r\nx\r\n" % (b"e" * 1998) for _ in range(100)) + b"0\r\n\r\n"],
    ],
    ids=["huge-extension", "noisy"],
)
async def test_too_much_chunk_overhead_answers_400(server: int, body: list[bytes]) -> None:
    out = await raw(server, [CHUNKED_POST, *body])
    assert out.startswith(b"HTTP/1.1 400 ") and b"too much non-data" in out
    await still_up(server)


# The read that completes the head is counted too: before, up to 64 KiB of extensions that
# came with the head went uncounted.
FIRST_READ_OVERHEAD = CHUNKED_POST + b"1;" + b"e" * 20000 + b"\r\nx\r\n"


async def test_chunk_overhead_in_the_same_read_as_the_head_answers_400(server: int) -> None:
    out = await raw(server, [FIRST_READ_OVERHEAD + b"0\r\n\r\n"])
    assert out.startswith(b"HTTP/1.1 400 ") and b"too much non-data" in out, out[:300]
    await still_up(server)


def _connection() -> Any:
    from meshcore._http._server import ServerConnection

    return ServerConnection(None, LIMITS, ConnectionInfo())  # type: ignore[arg-type]  # feed() reads no stream


@pytest.mark.parametrize(
    "reads",
    [
        [FIRST_READ_OVERHEAD],
        # the head's CRLFCRLF split across reads, each way
        *[
            [FIRST_READ_OVERHEAD[:n], FIRST_READ_OVERHEAD[n:]]
            for n in range(len(CHUNKED_POST) - 4, len(CHUNKED_POST) + 1)
        ],
        # a complete request before it in the same read
        [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + FIRST_READ_OVERHEAD],
    ],
    ids=["one-read", "split-4", "split-3", "split-2", "split-1", "split-0", "pipelined"],
)
def test_first_read_after_the_head_is_counted_exactly(reads: list[bytes]) -> None:
    from meshcore._http import RequestRejected

    conn = _connection()
    with pytest.raises(RequestRejected, match="too much non-data"):
        for data in reads:
            conn.feed(data)


def test_first_read_overhead_within_the_allowance_passes() -> None:
    """Exactly at Go's allowance the request passes; one byte more of extension fails."""
    from meshcore._http import RequestRejected
    from meshcore._http._bodies import MAX_CHUNK_EXCESS

    # after the head: "1;" + ext + CRLF, "x", CRLF = ext + 7 bytes, 1 of data, 1 chunk header;
    # excess = (ext + 7) - 3 * 1 - 16 * 1
    for extra, fails in ((0, False), (1, True)):
        conn = _connection()
        data = CHUNKED_POST + b"1;" + b"e" * (MAX_CHUNK_EXCESS + 12 + extra) + b"\r\nx\r\n"
        if fails:
            with pytest.raises(RequestRejected, match="too much non-data"):
                conn.feed(data)
        else:
            conn.feed(data)
            assert conn.cur.excess == MAX_CHUNK_EXCESS and not conn.cur.complete


def test_reason_phrases_cover_every_http_status():
    """The status line's phrases are written out (building `http.HTTPStatus` cost the sidecar's
    idle memory); each code Python knows has one, Python 3.11's phrase where unchanged since."""
    from http import HTTPStatus

    from meshcore._http._reasons import REASONS

    assert {s.value for s in HTTPStatus} <= set(REASONS)
    assert REASONS[200] == b"OK" and REASONS[404] == b"Not Found"
    assert REASONS[431] == b"Request Header Fields Too Large"
    assert all(phrase.isascii() and phrase for phrase in REASONS.values())
