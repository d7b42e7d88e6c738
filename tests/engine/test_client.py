"""HTTPConnector against independent servers: nginx, Python's http.server, raw sockets."""

from __future__ import annotations

import anyio
import pytest

from meshcore._endpoints import Endpoint
from meshcore._errors import (
    EndpointConnectError,
    EndpointProtocolError,
    EndpointReadError,
    EndpointTimeout,
)
from meshcore._http import HTTPConnector, PoolLimits, Timeouts, _connector
from meshcore._http._loop import adapt_stream
from meshcore._http._socket import StreamSocket
from meshcore._models import Request

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["socket", "stream"], autouse=True)
def client_io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every client test runs twice: on the socket the engine takes from the loop, and on the
    connection's anyio stream (the adapter any other stream goes through), one I/O path."""
    if request.param == "stream":

        async def adapted(stream):  # type: ignore[no-untyped-def]
            return adapt_stream(stream)

        monkeypatch.setattr(_connector, "socket_for", adapted)
    return request.param  # type: ignore[no-any-return]


def ep(server) -> Endpoint:  # type: ignore[no-untyped-def]
    return Endpoint("127.0.0.1", server.port)


async def get(connector: HTTPConnector, server, path: str, method: str = "GET", **kw):  # type: ignore[no-untyped-def]
    request = Request(method, f"{server.base}{path}", **kw)
    response = await connector.send(ep(server), request)
    body = await response.aread()
    return response, body


# nginx ----------------------------------------------------------------------------------------


async def test_nginx_get_and_keepalive_limit(nginx) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        for _ in range(7):
            response, body = await get(connector, nginx, "/")
            assert response.status_code == 200
            assert body == b"hello from nginx\n"
            assert response.extensions["http_version"] == b"HTTP/1.1"
            assert response.extensions["reason_phrase"] == b"OK"
        # keepalive_requests 3: nginx closes every third request with `Connection: close`,
        # so seven sequential requests took three connections and one is left idle.
        stats = connector.stats()[ep(nginx).id]
        assert stats == {"open": 1, "idle": 1, "in_use": 0, "waiting": 0, "stale_resends": 0}


async def test_nginx_chunked_response(nginx) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        response, body = await get(connector, nginx, "/chunked/text.txt")
        assert response.headers.get("transfer-encoding") == "chunked"
        assert body == b"yoyo " * 20000


async def test_nginx_large_body_streamed(nginx) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        response = await connector.send(ep(nginx), Request("GET", f"{nginx.base}/files/big.bin"))
        assert int(response.headers.get("content-length")) == len(nginx.big)
        pieces = [chunk async for chunk in response.stream]
        assert len(pieces) > 1  # streamed, not buffered whole
        assert b"".join(pieces) == nginx.big
        assert connector.stats()[ep(nginx).id]["idle"] == 1


async def test_nginx_head_and_204(nginx) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        response, body = await get(connector, nginx, "/files/big.bin", "HEAD")
        assert response.status_code == 200 and body == b""
        assert int(response.headers.get("content-length")) == len(nginx.big)
        response, body = await get(connector, nginx, "/204")
        assert response.status_code == 204 and body == b""
        # the connection survived both (nginx's third request closes it)
        response, body = await get(connector, nginx, "/files/small.txt")
        assert body == b"small file\n"
        assert connector.stats()[ep(nginx).id]["open"] == 0


async def test_nginx_connection_close(nginx) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        _, body = await get(connector, nginx, "/close")
        assert body == b"bye\n"
        assert connector.stats()[ep(nginx).id]["open"] == 0
        _, body = await get(connector, nginx, "/", headers=[("Connection", "close")])
        assert body == b"hello from nginx\n"
        assert connector.stats()[ep(nginx).id]["open"] == 0


async def test_nginx_concurrent_bounded_pool(nginx) -> None:  # type: ignore[no-untyped-def]
    results: list[bytes] = []
    async with HTTPConnector(limits=PoolLimits(max_connections=4, max_idle=2)) as connector:

        async def one() -> None:
            _, body = await get(connector, nginx, "/files/small.txt")
            results.append(body)

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(one)
        stats = connector.stats()[ep(nginx).id]
        assert stats["open"] <= 2 and stats["in_use"] == 0 and stats["waiting"] == 0
    assert results == [b"small file\n"] * 40


async def test_connection_given_back_while_others_exchange(nginx) -> None:  # type: ignore[no-untyped-def]
    # More busy connections than max_idle: giving one back closes a surplus idle one, which
    # yields, and another task starts an exchange on the connection just given back. The
    # response handed out must still be the one that was read (it once came out as status 0
    # with the next exchange's empty headers).
    bad: list[object] = []
    async with HTTPConnector(limits=PoolLimits(max_connections=8, max_idle=1)) as connector:

        async def worker() -> None:
            for _ in range(25):
                response, body = await get(connector, nginx, "/")
                if (response.status_code, body) != (200, b"hello from nginx\n") or not (
                    response.headers.get("content-length")
                ):
                    bad.append((response.status_code, list(response.headers), body))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(worker)
    assert bad == []


async def test_early_aclose_closes_connection(nginx) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        response = await connector.send(ep(nginx), Request("GET", f"{nginx.base}/files/big.bin"))
        await response.stream.__anext__()
        await response.aclose()
        assert connector.stats()[ep(nginx).id] == {"open": 0, "idle": 0, "in_use": 0, "waiting": 0, "stale_resends": 0}
        _, body = await get(connector, nginx, "/")
        assert body == b"hello from nginx\n"


# http.server ------------------------------------------------------------------------------


async def test_pyserver_host_header_and_custom_headers(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        _, body = await get(connector, pyserver, "/headers", headers=[("X-Test", "1")])
        assert f"host: 127.0.0.1:{pyserver.port}".encode() in body
        assert b"x-test: 1" in body


async def test_pyserver_post_content_length_and_chunked(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        response, body = await get(connector, pyserver, "/echo", "POST", stream=b"payload" * 5000)
        assert body == b"payload" * 5000 and response.headers.get("x-te") == "-"

        async def parts():  # type: ignore[no-untyped-def]
            for i in range(5):
                yield b"part%d;" % i

        response, body = await get(connector, pyserver, "/echo", "POST", stream=parts())
        assert body == b"part0;part1;part2;part3;part4;"
        assert response.headers.get("x-te") == "chunked"

        response, body = await get(connector, pyserver, "/echo", "POST", stream=b"")
        assert body == b""


async def test_pyserver_chunked_with_trailer(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        _, body = await get(connector, pyserver, "/chunked")
        assert body == b"one two three"
        _, body = await get(connector, pyserver, "/x")  # connection reused after the trailer
        assert body == b"GET /x"
        assert connector.stats()[ep(pyserver).id]["open"] == 1


async def test_pyserver_interim_responses_skipped(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        response, body = await get(connector, pyserver, "/interim")
        assert response.status_code == 200 and body == b"after interim"
        assert response.headers.get("link") is None  # the 103's fields stay with the 103


async def test_pyserver_body_until_close(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        _, body = await get(connector, pyserver, "/no-length")
        assert body == b"until-close " * 1000
        assert connector.stats()[ep(pyserver).id]["open"] == 0


async def test_pyserver_truncated_body_is_read_error(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        response = await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/truncated"))
        with pytest.raises(EndpointReadError) as info:
            await response.aread()
        assert info.value.endpoint == ep(pyserver) and not info.value.replayable
        assert connector.stats()[ep(pyserver).id]["open"] == 0


async def test_pyserver_garbage_is_protocol_error(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        with pytest.raises(EndpointProtocolError) as info:
            await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/garbage"))
        assert info.value.endpoint == ep(pyserver) and not info.value.replayable


async def test_read_timeout(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector(timeouts=Timeouts(read=0.2)) as connector:
        with pytest.raises(EndpointTimeout) as info:
            await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/hang"))
        assert not info.value.replayable
        # a per-request override, httpx-style
        with pytest.raises(EndpointTimeout):
            await connector.send(
                ep(pyserver),
                Request(
                    "GET",
                    f"{pyserver.base}/hang",
                    extensions={"timeout": {"connect": 1, "read": 0.1, "write": 1, "pool": 1}},
                ),
            )
        assert connector.stats()[ep(pyserver).id]["open"] == 0


async def test_pool_timeout(pyserver) -> None:  # type: ignore[no-untyped-def]
    limits = PoolLimits(max_connections=1)
    async with HTTPConnector(limits=limits, timeouts=Timeouts(pool=0.1)) as connector:
        response = await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/partial"))
        with pytest.raises(EndpointTimeout) as info:
            await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/b"))
        assert info.value.replayable
        assert connector.stats()[ep(pyserver).id]["waiting"] == 0
        await response.aclose()
        _, body = await get(connector, pyserver, "/c")
        assert body == b"GET /c"


async def test_waiters_are_served_in_order(pyserver) -> None:  # type: ignore[no-untyped-def]
    order: list[int] = []
    async with HTTPConnector(limits=PoolLimits(max_connections=1)) as connector:
        first = await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/partial"))

        async def one(i: int) -> None:
            await get(connector, pyserver, f"/{i}")
            order.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
                await anyio.wait_all_tasks_blocked()
            assert connector.stats()[ep(pyserver).id]["waiting"] == 5
            await first.aclose()  # closes the connection: its slot goes to the first waiter
    assert order == [0, 1, 2, 3, 4]


async def test_connect_error_names_endpoint() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        endpoint = Endpoint("127.0.0.1", port)
        async with HTTPConnector() as connector:
            with pytest.raises(EndpointConnectError) as info:
                await connector.send(endpoint, Request("GET", f"http://127.0.0.1:{port}/"))
            assert info.value.endpoint == endpoint and info.value.replayable
            assert endpoint.id in str(info.value)
            assert connector.stats()[endpoint.id]["open"] == 0


async def test_header_injection_refused(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        with pytest.raises(EndpointProtocolError):
            await connector.send(
                ep(pyserver),
                Request("GET", f"{pyserver.base}/", headers=[("X-A", "1\r\nX-Evil: 1")]),
            )


@pytest.mark.parametrize(
    "field", [("X-A", "1\rX-B: 1"), ("X-A", "1\nX-B: 1"), ("X-A\nX-B", "1"), ("X\rA", "1")]
)
async def test_lone_cr_or_lf_in_a_header_refused(pyserver, field: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        with pytest.raises(EndpointProtocolError):
            await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/", headers=[field]))


# the stale keep-alive race ----------------------------------------------------------------


async def test_stale_keepalive_get_resent_transparently(stale_server) -> None:  # type: ignore[no-untyped-def]
    endpoint = Endpoint("127.0.0.1", stale_server.port)
    url = f"http://127.0.0.1:{stale_server.port}"
    async with HTTPConnector() as connector:
        for path in ("/one", "/two"):
            response = await connector.send(endpoint, Request("GET", url + path))
            assert await response.aread() == b"ok"
        assert connector.stats()[endpoint.id]["stale_resends"] == 1
    # /two went out on the reused connection 1, which closed; then once more on connection 2
    assert stale_server.seen == [
        (1, "GET /one HTTP/1.1"),
        (1, "GET /two HTTP/1.1"),
        (2, "GET /two HTTP/1.1"),
    ]


async def test_stale_keepalive_post_not_resent(stale_server) -> None:  # type: ignore[no-untyped-def]
    endpoint = Endpoint("127.0.0.1", stale_server.port)
    url = f"http://127.0.0.1:{stale_server.port}"
    async with HTTPConnector() as connector:
        response = await connector.send(endpoint, Request("GET", url + "/one"))
        await response.aread()
        with pytest.raises(EndpointReadError) as info:
            await connector.send(endpoint, Request("POST", url + "/pay", stream=b"{}"))
        assert info.value.replayable and info.value.endpoint == endpoint
        assert connector.stats()[endpoint.id]["stale_resends"] == 0
    assert stale_server.seen == [(1, "GET /one HTTP/1.1"), (1, "POST /pay HTTP/1.1")]


async def test_fresh_connection_failure_is_not_replayable(stale_server) -> None:  # type: ignore[no-untyped-def]
    # A GET that fails on a *new* connection is not the stale race: no resend, not replayable.
    endpoint = Endpoint("127.0.0.1", stale_server.port)
    url = f"http://127.0.0.1:{stale_server.port}"
    async with HTTPConnector() as connector:
        await (await connector.send(endpoint, Request("GET", url + "/one"))).aread()
        with pytest.raises(EndpointReadError) as info:

            async def body():  # type: ignore[no-untyped-def]
                yield b"x"

            await connector.send(endpoint, Request("PUT", url + "/streamed", stream=body()))
        assert info.value.replayable  # reused connection, no answer: the retry layer decides
    assert [line for _, line in stale_server.seen].count("PUT /streamed HTTP/1.1") == 1


async def test_idle_connection_closed_by_peer_is_not_reused(pyserver) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        await get(connector, pyserver, "/close")  # the server closes: nothing pooled
        assert connector.stats()[ep(pyserver).id]["open"] == 0
        before = len(pyserver.log)
        _, body = await get(connector, pyserver, "/after")
        assert body == b"GET /after" and len(pyserver.log) == before + 1


# virtual time ---------------------------------------------------------------------------------


def _mock_clock():  # type: ignore[no-untyped-def]
    from trio.testing import MockClock

    return MockClock(autojump_threshold=0)


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": _mock_clock()}), id="trio-mockclock")]
)
async def test_pool_timeout_in_virtual_time(pyserver) -> None:  # type: ignore[no-untyped-def]
    import time

    limits = PoolLimits(max_connections=1)
    # connect/read unbounded: autojump would otherwise fire them while real sockets work
    timeouts = Timeouts(connect=None, read=None, write=None, pool=30.0)
    async with HTTPConnector(limits=limits, timeouts=timeouts) as connector:
        held = await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/partial"))
        wall, virtual = time.monotonic(), anyio.current_time()
        with pytest.raises(EndpointTimeout):
            await connector.send(ep(pyserver), Request("GET", f"{pyserver.base}/b"))
        assert anyio.current_time() - virtual >= 30.0
        assert time.monotonic() - wall < 5.0
        await held.aclose()


# small bodies, idle expiry, liveness peek ----------------------------------------------------


async def test_small_body_frees_connection_at_once(nginx) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector() as connector:
        response = await connector.send(ep(nginx), Request("GET", f"{nginx.base}/"))
        # the body came with the head: the connection is idle before anyone reads the body
        assert connector.stats()[ep(nginx).id] == {"open": 1, "idle": 1, "in_use": 0, "waiting": 0, "stale_resends": 0}
        assert [chunk async for chunk in response.stream] == [b"hello from nginx\n"]  # type: ignore[union-attr]
        await response.aclose()


async def test_idle_expiry(nginx) -> None:  # type: ignore[no-untyped-def]
    async with HTTPConnector(limits=PoolLimits(idle_expiry=0.05)) as connector:
        await get(connector, nginx, "/")
        assert connector.stats()[ep(nginx).id]["idle"] == 1
        await anyio.sleep(0.1)  # the point is time passing: let the idle connection expire
        await get(connector, nginx, "/")
        # the expired one was closed, a new one served the request and is idle now
        assert connector.stats()[ep(nginx).id] == {"open": 1, "idle": 1, "in_use": 0, "waiting": 0, "stale_resends": 0}


@pytest.mark.parametrize(
    "anyio_backend",
    ["asyncio", "trio", pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")],
)
async def test_idle_connection_closed_by_server_is_detected(anyio_backend) -> None:  # type: ignore[no-untyped-def]
    """A server closes an idle keep-alive connection; after a quiet second the pool peeks at it
    before reuse, so even a POST (never resent) goes out on a fresh connection."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served: list[bytes] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                served.append(data.split(b"\r\n")[0])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            # closed right after answering, without `Connection: close`: the client pooled it

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    endpoint = Endpoint("127.0.0.1", port)
    try:
        async with HTTPConnector(limits=PoolLimits(idle_expiry=None)) as connector:
            r = await connector.send(endpoint, Request("GET", f"http://127.0.0.1:{port}/a"))
            assert await r.aread() == b"ok"
            await anyio.sleep(1.1)  # past the window in which idle connections are trusted
            r = await connector.send(
                endpoint, Request("POST", f"http://127.0.0.1:{port}/b", stream=b"x")
            )
            assert await r.aread() == b"ok"
    finally:
        thread.join(5)
        listener.close()
    assert served == [b"GET /a HTTP/1.1", b"POST /b HTTP/1.1"]


# direct sockets: timeouts cost a cancel scope only when a read or write waits ---------------


async def test_connections_use_the_direct_socket(nginx, client_io: str) -> None:  # type: ignore[no-untyped-def]
    """Plain TCP on trio and asyncio drives the socket itself (the fast path the benchmarks
    measure); the tests around it would otherwise silently exercise the stream adapter only."""
    import socket

    async with HTTPConnector() as connector:
        await get(connector, nginx, "/")
        (conn,) = connector._pools[ep(nginx)].idle
        assert type(conn.io.sock) is (socket.socket if client_io == "socket" else StreamSocket)


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": _mock_clock()}), id="trio-mockclock")]
)
@pytest.mark.parametrize("gap, fails", [(20.0, False), (40.0, True)])
async def test_read_timeout_is_between_reads_in_virtual_time(gap: float, fails: bool) -> None:
    """read=30: a body whose pieces come 20 virtual seconds apart (60 s in all) is fine, one
    with a 40 s gap is a timeout; measured between two reads, not over the whole response."""
    import time

    from meshcore._http import serve_http
    from meshcore._models import Response

    async def pieces():  # type: ignore[no-untyped-def]
        for piece in (b"a", b"b", b"c"):
            yield piece
            await anyio.sleep(gap)

    async def handler(request, info):  # type: ignore[no-untyped-def]
        return Response(200, [(b"content-type", b"text/plain")], pieces())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    endpoint = Endpoint("127.0.0.1", port)
    timeouts = Timeouts(connect=None, read=30.0, write=30.0, pool=None)
    wall, virtual = time.monotonic(), anyio.current_time()
    async with anyio.create_task_group() as tg, HTTPConnector(timeouts=timeouts) as connector:
        tg.start_soon(serve_http, listener, handler)
        response = await connector.send(endpoint, Request("GET", f"http://127.0.0.1:{port}/"))
        if fails:
            with pytest.raises(EndpointTimeout) as info:
                await response.aread()
            assert not info.value.replayable
            assert 30.0 <= anyio.current_time() - virtual < 40.0
        else:
            assert await response.aread() == b"abc"
            assert anyio.current_time() - virtual >= 3 * gap
        tg.cancel_scope.cancel()
    assert time.monotonic() - wall < 5.0


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": _mock_clock()}), id="trio-mockclock")]
)
async def test_response_head_timeout_in_virtual_time() -> None:
    """A server that takes the request and never answers: read timeout after 30 virtual s."""
    import socket
    import time

    listener = socket.create_server(("127.0.0.1", 0))  # never accepts: the kernel holds it
    port = listener.getsockname()[1]
    timeouts = Timeouts(connect=None, read=30.0, write=None, pool=None)
    try:
        async with HTTPConnector(timeouts=timeouts) as connector:
            wall, virtual = time.monotonic(), anyio.current_time()
            with pytest.raises(EndpointTimeout, match="read timeout"):
                await connector.send(
                    Endpoint("127.0.0.1", port), Request("GET", f"http://127.0.0.1:{port}/")
                )
            assert 30.0 <= anyio.current_time() - virtual < 31.0
            assert time.monotonic() - wall < 5.0
            assert connector.stats()[f"127.0.0.1:{port}"]["open"] == 0
    finally:
        listener.close()


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": _mock_clock()}), id="trio-mockclock")]
)
async def test_write_timeout_in_virtual_time() -> None:
    """A server that never reads: once the socket buffers are full the body cannot move, and
    the write timeout fires after 30 virtual seconds without progress."""
    import socket
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    timeouts = Timeouts(connect=None, read=None, write=30.0, pool=None)
    body = b"x" * (64 << 20)  # far more than loopback's socket buffers hold
    try:
        async with HTTPConnector(timeouts=timeouts) as connector:
            wall, virtual = time.monotonic(), anyio.current_time()
            with pytest.raises(EndpointTimeout, match="write timeout") as info:
                await connector.send(
                    Endpoint("127.0.0.1", port),
                    Request("POST", f"http://127.0.0.1:{port}/", stream=body),
                )
            assert not info.value.replayable
            assert 30.0 <= anyio.current_time() - virtual < 31.0
            assert time.monotonic() - wall < 5.0
    finally:
        listener.close()


async def test_set_ssl_context_applies_to_new_connections_only(upstream) -> None:  # type: ignore[no-untyped-def]
    """Rotation: pooled connections keep their context; new ones use the new one (here a TLS
    context against a plain server, so a new connection fails its handshake)."""
    import ssl

    from meshcore._errors import EndpointError

    server = upstream("plain")
    endpoint = Endpoint.parse(server.address)
    url = f"http://{server.address}"
    async with HTTPConnector() as connector:
        await (await connector.send(endpoint, Request("GET", f"{url}/"))).aread()  # pooled
        connector.set_ssl_context(ssl.create_default_context())
        slow: list[int] = []

        async def hold_the_pooled_connection() -> None:
            response = await connector.send(endpoint, Request("GET", f"{url}/delay/0.3"))
            await response.aread()
            slow.append(response.status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_the_pooled_connection)
            await anyio.wait_all_tasks_blocked()
            # the pooled plain connection is busy: this needs a new one, which is TLS now
            with pytest.raises(EndpointError):
                await connector.send(endpoint, Request("GET", f"{url}/"))
        assert slow == [200]  # the pooled plain connection kept working
