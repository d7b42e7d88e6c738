"""Bad clients and bad upstreams: the right status or a close, the sidecar stays up, and its
open connections return to the baseline afterwards."""

from __future__ import annotations

import anyio
import httpx
import pytest

from meshcore.testing import static_service

from .conftest import open_connections, raw_exchange, running_sidecar, sidecar_config, url, wait_for

pytestmark = pytest.mark.anyio

LIMITS = dict(
    max_request_line=256,
    max_header_count=20,
    max_header_bytes=2048,
    max_body=10_000,
    header_timeout=0.3,
    body_timeout=0.3,
)


async def _still_serving(sidecar):
    async with httpx.AsyncClient() as client:
        r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders", "connection": "close"})
    assert r.status_code == 200
    await wait_for(lambda: open_connections(sidecar) == {"outbound": 0, "inbound": 0, "admin": 0})
    assert sidecar.in_flight == 0


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\nHost: orders\r\n\r\n", 400),
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: orders\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: orders\r\n" + b"X-Big: " + b"b" * 3000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: orders\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: orders\r\nHost: users\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 20000\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ],
    ids=["garbage", "version", "long-target", "big-header", "many-headers", "no-host",
         "two-hosts", "body-too-large", "bad-chunk", "cl-and-te"],
)
async def test_malformed_requests_get_an_error_and_a_close(upstream, data, status):
    server = upstream()
    config = sidecar_config({"orders": static_service([server])}, **LIMITS)
    async with running_sidecar(config) as sidecar:
        with anyio.fail_after(5):
            answer = await raw_exchange(sidecar, "outbound", data)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
        assert b"connection: close" in answer.lower()
        await _still_serving(sidecar)
    assert all(seen[1] == "/" and "x-big" not in seen[2] for seen in server.seen)
    assert server.requests <= 1


async def test_slowloris_gets_408_and_is_closed(upstream):
    config = sidecar_config({"orders": static_service([upstream()])}, **LIMITS)
    async with running_sidecar(config) as sidecar:
        address = sidecar.addresses["outbound"]
        async with await anyio.connect_tcp(address.host, address.port) as stream:
            start = anyio.current_time()
            await stream.send(b"GET / HTTP/1.1\r\nHost: ord")
            received = b""
            # A header timeout that each byte restarted would keep this loop going: the guard.
            with anyio.fail_after(5):
                while True:
                    await anyio.sleep(0.05)  # one byte at a time, never finishing the head
                    try:
                        await stream.send(b"e")
                    except (anyio.BrokenResourceError, OSError):
                        break
                    with anyio.move_on_after(0.001):
                        try:
                            received += await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
            with anyio.move_on_after(0.5):
                try:
                    while True:
                        received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
        assert received.startswith(b"HTTP/1.1 408 ")
        assert 0.25 < anyio.current_time() - start  # the 0.3 s header timeout, not sooner
        await _still_serving(sidecar)


async def test_client_disconnecting_mid_body(upstream):
    server = upstream()
    config = sidecar_config({"orders": static_service([server])}, **LIMITS)
    async with running_sidecar(config) as sidecar:
        address = sidecar.addresses["outbound"]
        for head in (
            b"POST /echo HTTP/1.1\r\nHost: orders\r\nContent-Length: 5000\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n",
        ):
            stream = await anyio.connect_tcp(address.host, address.port)
            await stream.send(head + b"x" * 10)
            await anyio.sleep(0.05)
            await stream.aclose()
        await _still_serving(sidecar)


async def test_body_stalling_mid_way_gets_the_connection_closed(upstream):
    config = sidecar_config({"orders": static_service([upstream()])}, **LIMITS)
    async with running_sidecar(config) as sidecar:
        with anyio.fail_after(3):
            answer = await raw_exchange(
                sidecar, "outbound",
                b"POST /echo HTTP/1.1\r\nHost: orders\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10,
            )
        # The body went upstream as it came; when it stalls the sidecar gives up on it.
        assert answer == b"" or answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 502", b"HTTP/1.1 400"))
        await _still_serving(sidecar)


async def test_upstream_disconnecting_mid_response(upstream, cut_upstream):
    async with anyio.create_task_group() as tg:
        await tg.start(cut_upstream.run)
        config = sidecar_config(
            {"orders": static_service([upstream()]), "cut": static_service([cut_upstream.address])}
        )
        async with running_sidecar(config) as sidecar:
            with anyio.fail_after(5):
                answer = await raw_exchange(
                    sidecar, "outbound", b"GET / HTTP/1.1\r\nHost: cut\r\nConnection: close\r\n\r\n"
                )
            if cut_upstream.length <= 16384:
                # A small body is read before the head goes out, so the cut is still a 502.
                assert answer.startswith(b"HTTP/1.1 502 ")
                assert b"x-meshcore-error: upstream_error" in answer
            else:
                # The head was already sent: the only honest signal left is closing early.
                assert answer.startswith(b"HTTP/1.1 200 ")
                head, _, body = answer.partition(b"\r\n\r\n")
                assert b"content-length: 100000" in head.lower()
                assert body == b"0123456789"
            await _still_serving(sidecar)
            assert sidecar.generation.mesh.upstream("cut").connector.stats()[cut_upstream.address]["open"] == 0
        tg.cancel_scope.cancel()


async def test_upstream_closing_before_the_head_is_502(upstream):
    dropper = upstream("drop", drop=True)
    config = sidecar_config({"orders": static_service([upstream()]), "drop": static_service([dropper])})
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "drop"})
        assert r.status_code == 502
        assert r.headers["x-meshcore-error"] == "upstream_error"
        await _still_serving(sidecar)
