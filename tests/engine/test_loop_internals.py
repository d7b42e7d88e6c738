"""Guards of every internal `meshcore/_http/_loop.py` takes from anyio, asyncio, uvloop and
trio: each test fails when the internal it names moves (at run time the engine would log a
warning and fall back to anyio's public API, slower but correct)."""

from __future__ import annotations

import asyncio
import logging
import socket

import anyio
import anyio.abc
import pytest

from meshcore._http import _loop
from meshcore._http._socket import Socket, StreamSocket

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    if request.param != "asyncio":
        pytest.importorskip("uvloop" if isinstance(request.param, tuple) else "trio")
    return request.param


@pytest.fixture(autouse=True)
def no_drift(caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    """No test here may pass through a fallback: the warning would say an internal moved."""
    _loop._warned.clear()
    with caplog.at_level(logging.WARNING, logger="meshcore.http"):
        yield
    assert not [r for r in caplog.records if "falls back" in r.getMessage()]


def on_trio() -> bool:
    try:
        import sniffio

        return sniffio.current_async_library() == "trio"
    except ImportError:  # pragma: no cover
        return False


async def test_the_backend_is_found_through_anyios_private_helper() -> None:
    from anyio._core._eventloop import get_async_backend  # the name _loop imports

    assert get_async_backend().__module__ == (
        "anyio._backends._trio" if on_trio() else "anyio._backends._asyncio"
    )


async def test_the_clock_is_the_backends_own() -> None:
    clock = _loop.backend_clock()
    if on_trio():
        import trio

        assert clock is trio.current_time
    else:
        assert clock == asyncio.get_running_loop().time
    assert abs(clock() - anyio.current_time()) < 1.0


async def test_the_checkpoint_is_the_backends_own() -> None:
    checkpoint = _loop.backend_checkpoint()
    if on_trio():
        import trio

        assert checkpoint is trio.lowlevel.checkpoint
    else:
        assert checkpoint is _loop._yield_to_loop
    with anyio.CancelScope() as scope:  # a cancellation lands on it
        scope.cancel()
        await checkpoint()
    assert scope.cancelled_caught


async def test_the_socket_of_a_tcp_stream_is_taken_with_what_was_read_before() -> None:
    """trio: `backend.wait_readable/wait_writable` (anyio's backend class); asyncio: the
    stream's `_transport` and `_protocol` (`read_queue`, `is_at_eof`, `exception`),
    `selector_events._SelectorSocketTransport` and its `TransportSocket._sock`; uvloop: its
    transport's module `uvloop.loop`."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, await anyio.connect_tcp("127.0.0.1", port) as client:
        server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
        await client.send(b"early")
        if not on_trio():  # let the transport read it, as it does before the engine gets there
            for _ in range(20):
                await anyio.sleep(0.005)
                if server._protocol.read_queue:  # type: ignore[attr-defined]
                    break
        io = await _loop.take_socket(server)
        assert isinstance(io, Socket) and type(io.sock) is socket.socket
        got = io.pending
        while len(got) < 5:
            try:
                got += io.sock.recv(100)
            except BlockingIOError:
                await io.wait_readable(5)
        assert got == b"early"
        assert (io.batch is None) == on_trio()  # the send batch is asyncio's and uvloop's
        io.sock.send(b"late")
        assert await client.receive() == b"late"
        with pytest.raises(TimeoutError):  # the wait's own limit
            await io.wait_readable(0.01)
        with pytest.raises(TimeoutError):  # a deadline already past (a slow head's)
            await io.wait_readable(-0.5)
        await io.aclose()
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await client.receive()


async def test_what_cannot_be_taken_is_adapted() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](1)
    from anyio.streams.stapled import StapledObjectStream

    stream = StapledObjectStream(send, receive)
    assert await _loop.take_socket(stream) is None
    io = await _loop.socket_for(stream)  # type: ignore[arg-type]
    assert isinstance(io.sock, StreamSocket)
    await io.aclose()


async def test_a_moved_internal_is_reported_not_silent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import anyio._core._eventloop as eventloop

    monkeypatch.delattr(eventloop, "get_async_backend")
    assert _loop.backend_clock() is anyio.current_time
    assert _loop.backend_checkpoint() is anyio.lowlevel.checkpoint
    messages = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(messages) == 2 and "the clock" in messages[0]
    caplog.clear()  # (the autouse guard would fail on these, rightly elsewhere)


async def test_a_stream_that_stays_a_stream_can_still_be_peeked() -> None:
    """`adapt_stream` finds the socket under the stream for the pool's liveness peek: trio's
    own, asyncio's inside `TransportSocket._sock`, uvloop's by the descriptor of its
    pseudo-socket (`_FdPeek`: the pseudo-socket refuses recv)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, await anyio.connect_tcp("127.0.0.1", port) as client:
        server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
        io = _loop.adapt_stream(client)
        assert isinstance(io.sock, StreamSocket)
        uvloop = type(client._transport).__module__ == "uvloop.loop" if not on_trio() else False  # type: ignore[attr-defined]
        assert isinstance(io.sock.peek, _loop._FdPeek if uvloop else socket.socket)
        with pytest.raises(BlockingIOError):  # alive, nothing pending
            io.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        await server.aclose()
        with anyio.fail_after(5):
            while True:
                try:
                    assert io.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                    break
                except BlockingIOError:
                    await anyio.sleep(0.01)
        if uvloop:  # the transport closed: its descriptor is gone, the peek says the end
            await client.aclose()
            assert io.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
