"""The loop's SendBatch: sends held to the end of the loop's pass, and what it leaves behind.

About asyncio and uvloop (trio has no batch: its writers send at once), so these run on those
two. The engine's own use of the batch is tested end to end in test_server.py and
test_client.py (large responses and requests the socket does not take in one send).
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Iterator

import pytest

from meshcore._http._parse import DirectSocket, send_batch

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    if request.param != "asyncio":
        pytest.importorskip("uvloop")
    return request.param


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


async def _never(timeout: float | None = None) -> None:
    raise AssertionError("the batch never waits")


def direct(sock: socket.socket) -> DirectSocket:
    return DirectSocket(sock, _never, _never, False, batch=send_batch(asyncio.get_running_loop()))


def received(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            got = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not got:
            return out
        out += got


async def test_sends_wait_for_the_end_of_the_loops_pass(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    c, d = socket.socketpair()
    with c, d:
        first, second = direct(a), direct(c)
        first.batch.add(first, b"one")  # type: ignore[union-attr]
        second.batch.add(second, b"two")  # type: ignore[union-attr]
        first.batch.add(first, b"three")  # type: ignore[union-attr]
        d.setblocking(False)
        assert received(b) == b"" and received(d) == b""  # nothing sent yet
        await asyncio.sleep(0)  # the writer's yield: the flush ran before it returns
        assert received(b) == b"onethree" and received(d) == b"two"
        assert first.unsent is None and second.unsent is None


async def test_what_the_socket_does_not_take_is_left_to_the_writer(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    data = bytes(range(256)) * 8192  # 2 MiB: more than a socketpair's buffers hold
    io = direct(a)
    io.batch.add(io, data)  # type: ignore[union-attr]
    await asyncio.sleep(0)
    assert io.unsent is not None
    rest = bytes(io.take_unsent())
    assert io.unsent is None
    got = received(b)
    assert got and rest and got + rest == data  # in order, nothing lost, nothing twice


async def test_a_failed_send_is_left_to_the_writer(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    b.close()
    io = direct(a)
    io.batch.add(io, b"to nobody")  # type: ignore[union-attr]
    await asyncio.sleep(0)  # the flush swallowed the error ...
    assert io.unsent == b"to nobody"
    with pytest.raises(OSError):  # ... and the writer's own send raises it
        a.send(io.take_unsent())


def test_one_batch_per_loop_and_none_kept_for_a_closed_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert send_batch(loop) is send_batch(loop)
        other = asyncio.new_event_loop()
        assert send_batch(other) is not send_batch(loop)
        other.close()
    finally:
        loop.close()
    from meshcore._http import _parse

    count = len(_parse._batches)
    del loop, other
    gc.collect()
    assert len(_parse._batches) <= count - 2  # the batch did not keep its loop alive
