"""Limits a hostile upstream or client can hit: response heads, chunk extensions, silent
connections. Raw loopback sockets play the hostile side."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import meshcore
from meshcore import ResponseHeadTooLarge
from meshcore._endpoints import Endpoint
from meshcore._errors import EndpointProtocolError
from meshcore._http import HTTPConnector, PoolLimits
from meshcore._models import Request
from meshcore._transport import as_httpx_error
from meshcore.testing import raw_upstream, static_service

pytestmark = pytest.mark.anyio


async def fetch(port: int, limits: PoolLimits | None = None) -> bytes:
    async with HTTPConnector(limits=limits or PoolLimits()) as connector:
        response = await connector.send(
            Endpoint("127.0.0.1", port), Request("GET", f"http://127.0.0.1:{port}/")
        )
        return await response.aread()


HUGE_HEADER = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 << 20) + b"\r\nContent-Length: 2\r\n\r\nok"
MANY_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    + b"Content-Length: 2\r\n\r\nok"
)


@pytest.mark.parametrize("response", [HUGE_HEADER, MANY_HEADERS], ids=["2MB-header", "10k-headers"])
async def test_response_head_over_the_limits_is_an_endpoint_error(response: bytes) -> None:
    with raw_upstream(response) as port:
        with pytest.raises(ResponseHeadTooLarge, match="exceeds the limits") as info:
            await fetch(port)
    assert isinstance(info.value, EndpointProtocolError)
    assert info.value.kind == "protocol-error"  # counted against the endpoint like bad HTTP
    assert info.value.endpoint == Endpoint("127.0.0.1", port)
    # library mode: the transport's mapping makes it an httpx.RemoteProtocolError
    mapped = as_httpx_error(info.value, httpx.Request("GET", f"http://127.0.0.1:{port}/"))
    assert isinstance(mapped, httpx.RemoteProtocolError)


async def test_response_head_limits_are_configurable() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    with raw_upstream(head + b"Content-Length: 2\r\n\r\nok") as port:
        assert await fetch(port, PoolLimits(max_response_header_count=200)) == b"ok"
    with raw_upstream(head + b"Content-Length: 2\r\n\r\nok") as port:
        with pytest.raises(ResponseHeadTooLarge):
            await fetch(port)  # the default: 100 fields
    with pytest.raises(ValueError, match="max_response_header_bytes"):
        PoolLimits(max_response_header_bytes=10)


# chunk extensions: Go's allowance, 16 bytes per chunk + twice its data, 16 KiB beyond -------

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
EXT_100 = b";name=" + b"v" * 94  # a 100-byte extension
LEGIT_CHUNKS = b"".join(b"400%b\r\n%b\r\n" % (EXT_100, b"d" * 1024) for _ in range(64)) + b"0\r\n\r\n"
HUGE_EXTENSION = b"1;" + b"e" * (16 << 20) + b"\r\nx\r\n0\r\n\r\n"
# 2000 bytes of extension per byte of data: 1982 bytes over the allowance each time
NOISY_CHUNKS = b"".join(b"1;%b\r\nx\r\n" % (b"e" * 1998) for _ in range(100)) + b"0\r\n\r\n"


async def test_chunk_extensions_within_the_allowance_pass() -> None:
    with raw_upstream(CHUNKED_HEAD + LEGIT_CHUNKS) as port:
        assert await fetch(port) == b"d" * 65536


@pytest.mark.parametrize("chunks", [HUGE_EXTENSION, NOISY_CHUNKS], ids=["16MiB-extension", "noisy"])
async def test_too_much_chunk_overhead_is_an_endpoint_error(chunks: bytes) -> None:
    with raw_upstream(CHUNKED_HEAD + chunks) as port:
        with pytest.raises(EndpointProtocolError, match="too much non-data") as info:
            await fetch(port)
    assert info.value.endpoint == Endpoint("127.0.0.1", port)


async def test_library_mode_raises_remote_protocol_error() -> None:
    with raw_upstream(HUGE_HEADER) as port:
        config = {"services": {"orders": static_service([f"127.0.0.1:{port}"])}}
        async with meshcore.Mesh(config, []) as mesh:
            async with mesh.client() as client:
                with pytest.raises(httpx.RemoteProtocolError, match="exceeds the limits") as info:
                    await client.get("http://orders/")
    assert isinstance(info.value, ResponseHeadTooLarge)


# The read the response head ended in is counted too (before, up to one read went uncounted).
FIRST_READ_OVERHEAD = CHUNKED_HEAD + b"1;" + b"e" * 20000 + b"\r\nx\r\n"


def _response_connection() -> Any:
    from types import SimpleNamespace

    from meshcore._http._http11 import HTTP11Connection

    conn = HTTP11Connection(SimpleNamespace(sock=None), Endpoint("127.0.0.1", 1), None)  # type: ignore[arg-type]  # feed() does no I/O
    conn.start(False)
    return conn


@pytest.mark.parametrize(
    "reads",
    [
        [FIRST_READ_OVERHEAD],
        [FIRST_READ_OVERHEAD + b"0\r\n\r\n"],  # the whole response in one read
        *[
            [FIRST_READ_OVERHEAD[:n], FIRST_READ_OVERHEAD[n:]]
            for n in range(len(CHUNKED_HEAD) - 4, len(CHUNKED_HEAD) + 1)
        ],
        [b"HTTP/1.1 100 Continue\r\n\r\n" + FIRST_READ_OVERHEAD],
    ],
    ids=["one-read", "whole", "split-4", "split-3", "split-2", "split-1", "split-0", "after-100"],
)
def test_first_read_after_the_response_head_is_counted(reads: list[bytes]) -> None:
    conn = _response_connection()
    with pytest.raises(EndpointProtocolError, match="too much non-data"):
        for data in reads:
            conn.feed(data)


def test_first_read_response_overhead_at_the_allowance_passes() -> None:
    from meshcore._http._bodies import MAX_CHUNK_EXCESS

    # after the head: "1;" + ext + CRLF, "x", CRLF = ext + 7 bytes, 1 of data, 1 chunk header
    for extra in (0, 1):
        conn = _response_connection()
        data = CHUNKED_HEAD + b"1;" + b"e" * (MAX_CHUNK_EXCESS + 12 + extra) + b"\r\nx\r\n"
        if extra:
            with pytest.raises(EndpointProtocolError, match="too much non-data"):
                conn.feed(data)
        else:
            conn.feed(data)
            assert conn.excess == MAX_CHUNK_EXCESS


async def test_overhead_with_the_head_from_a_real_socket_is_an_endpoint_error() -> None:
    with raw_upstream(FIRST_READ_OVERHEAD + b"0\r\n\r\n") as port:
        with pytest.raises(EndpointProtocolError, match="too much non-data"):
            await fetch(port)
