"""The waits of connections the sidecar's listeners accept on trio (`_loop._TrioSockets`): their
limits are the deadline of the connection's own cancel scope (no scope per wait), and they park
with trio's epoll manager directly. In virtual time (trio's MockClock): idle and header
timeouts, a deadline that does not outlive its wait, a cancellation that stays one, and the
engine's serve loop on top (quiet close when idle, 408 for a slow head, cancel)."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator

import anyio
import pytest

from meshcore import Response
from meshcore._http._loop import Acceptor, _EpollWait, _TrioSockets
from meshcore._http._server import ConnectionInfo, ServerLimits, serve_connection
from meshcore.testing import virtual_trio

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", [virtual_trio()])]

trio = pytest.importorskip("trio")


async def test_the_waits_are_the_epoll_ones(pair) -> None:  # type: ignore[no-untyped-def]
    io = _TrioSockets()(pair[0], None)
    assert type(io.wait_readable) is _EpollWait  # not trio's public waits (the fallback)


async def test_a_wait_times_out_at_the_scopes_deadline_and_leaves_none(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    with trio.CancelScope() as scope:
        io = _TrioSockets()(a, scope)
        start = trio.current_time()
        with pytest.raises(TimeoutError):
            await io.wait_readable(5.0)
        assert trio.current_time() - start == pytest.approx(5.0)
        assert scope.deadline == math.inf


async def test_a_wait_that_ends_in_time_clears_the_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    with trio.CancelScope() as scope:
        io = _TrioSockets()(a, scope)
        b.send(b"x")
        await io.wait_readable(1.0)
        assert scope.deadline == math.inf
        await trio.sleep(10.0)  # far past the wait's limit: nothing left to cancel the scope
        assert a.recv(10) == b"x"
        await io.wait_writable(1.0)
    assert not scope.cancelled_caught


async def test_a_cancel_during_a_limited_wait_is_a_cancel(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    with trio.CancelScope() as scope:
        io = _TrioSockets()(a, scope)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_after, scope, 1.0)
            await io.wait_readable(30.0)  # not a TimeoutError: the scope catches trio.Cancelled
            raise AssertionError("not cancelled")
    assert scope.cancelled_caught
    assert trio.current_time() - start < 30.0


async def _cancel_after(scope: trio.CancelScope, delay: float) -> None:
    await trio.sleep(delay)
    scope.cancel()


async def test_a_cancelled_wait_gives_its_slot_back(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    io = _TrioSockets()(a, None)
    with trio.move_on_after(1.0):  # a scope of its own (no connection scope given)
        await io.wait_readable(None)
    with pytest.raises(TimeoutError):
        await io.wait_readable(1.0)
    b.send(b"y")
    await io.wait_readable(1.0)  # registered again, and woken


async def test_two_readers_are_refused_as_trio_does(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    io = _TrioSockets()(a, None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(io.wait_readable, None)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await io.wait_readable(None)
        b.send(b"z")


async def test_closing_wakes_a_waiter(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    io = _TrioSockets()(a, None)
    woken: list[type[BaseException]] = []

    async def wait() -> None:
        try:
            await io.wait_readable(None)
        except trio.ClosedResourceError as exc:
            woken.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        await io.aclose()
    assert woken == [trio.ClosedResourceError]


# the engine on these sockets, as the sidecar's listeners run it --------------------------------

LIMITS = ServerLimits(header_timeout=2.0, idle_timeout=5.0)


async def hello(request, info) -> Response:  # type: ignore[no-untyped-def]
    if request.url.target == "/slow":
        await trio.sleep(30.0)  # longer than every limit: the handler's time is its own
    return Response(200, [("Content-Length", "2")], b"ok")


async def serve_one(listener: socket.socket, scopes: list[trio.CancelScope]) -> None:
    """Accept one connection and serve it as `_listeners._run_socket` does on trio."""
    acceptor = Acceptor(listener)
    await acceptor.wait()
    [(sock, address)] = acceptor.accept(1)
    with trio.CancelScope() as scope:
        scopes.append(scope)
        info = ConnectionInfo(address[:2], listener.getsockname()[:2])
        await serve_connection(None, hello, limits=LIMITS, io=acceptor.socket(sock, scope), info=info)


async def talk(port: int, *pieces: bytes) -> tuple[bytes, float]:
    """Send each piece (a float: sleep that long), then read until the server closes."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    received = b""
    async with stream:
        for piece in pieces:
            if isinstance(piece, float):
                await trio.sleep(piece)
            else:
                await stream.send(piece)
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received, trio.current_time()


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


async def test_an_idle_connection_is_closed_quietly_after_idle_timeout(listener) -> None:  # type: ignore[no-untyped-def]
    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, listener, scopes)
        start = trio.current_time()
        out, end = await talk(listener.getsockname()[1], GET, 1.0, GET)
    assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"ok")  # nothing after: quiet
    assert end - start == pytest.approx(1.0 + LIMITS.idle_timeout, abs=0.1)
    assert not scopes[0].cancelled_caught  # a timeout, not a cancellation


async def test_a_slow_head_gets_408(listener) -> None:  # type: ignore[no-untyped-def]
    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, listener, scopes)
        start = trio.current_time()
        out, end = await talk(listener.getsockname()[1], b"GET / HTTP/1.1\r\nHo")
    assert out.startswith(b"HTTP/1.1 408 ")
    assert end - start == pytest.approx(LIMITS.header_timeout, abs=0.1)


async def test_a_slow_handler_outlives_the_limits_of_earlier_waits(listener) -> None:  # type: ignore[no-untyped-def]
    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, listener, scopes)
        out, _ = await talk(
            listener.getsockname()[1], b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", 31.0, GET
        )
    assert out.count(b"HTTP/1.1 200 OK") == 2


async def test_a_cancelled_idle_connection_ends(listener) -> None:  # type: ignore[no-untyped-def]
    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, listener, scopes)
        start = trio.current_time()
        stream = await anyio.connect_tcp("127.0.0.1", listener.getsockname()[1])
        async with stream:
            await stream.send(GET)
            assert (await stream.receive()).endswith(b"ok")
            await trio.sleep(1.0)  # idle, well within idle_timeout
            scopes[0].cancel()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
    assert scopes[0].cancelled_caught
    assert trio.current_time() - start < LIMITS.idle_timeout
