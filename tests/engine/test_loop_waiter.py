"""`_LoopWaiter`: waits on asyncio and uvloop that keep their registration and their timer.

About asyncio and uvloop (trio's waits are anyio's), so these run on those two; the timers
are real (short) because they are the loop's own.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from meshcore._http._parse import _LoopWaiter

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
    yield a, b
    a.close()
    b.close()


class Spy:
    """The loop's add_reader/remove_reader, counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.adds = self.removes = 0

    def add(self, fd: int, callback: object) -> None:
        self.adds += 1
        self.loop.add_reader(fd, callback)

    def remove(self, fd: int) -> None:
        self.removes += 1
        self.loop.remove_reader(fd)


async def read(waiter: _LoopWaiter, sock: socket.socket, timeout: float | None) -> bytes:
    """As the engine reads: a wait is a hint, so a read that finds nothing waits again (a
    readiness event the loop collected before the last read can wake a wait once)."""
    while True:
        try:
            return sock.recv(10)
        except BlockingIOError:
            await waiter.wait(timeout)


def reader(sock: socket.socket) -> tuple[_LoopWaiter, Spy]:
    loop = asyncio.get_running_loop()
    spy = Spy(loop)
    return _LoopWaiter(loop, spy.add, spy.remove, sock, persistent=True), spy


async def test_the_registration_stays_between_waits(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    waiter, spy = reader(a)
    for _ in range(5):
        asyncio.get_running_loop().call_soon(b.send, b"x")
        assert await read(waiter, a, 5) == b"x"
    assert (spy.adds, spy.removes) == (1, 0)  # one registration for five waits
    waiter.release()
    assert (spy.adds, spy.removes) == (1, 1) and waiter.timer is None


async def test_readable_with_nobody_waiting_stops_listening(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    waiter, spy = reader(a)
    asyncio.get_running_loop().call_soon(b.send, b"1")
    await waiter.wait(None)
    assert a.recv(10) == b"1"
    b.send(b"2")  # arrives while the task is busy: the callback finds no waiter ...
    for _ in range(3):
        await asyncio.sleep(0)  # (passes of the loop; the data stays unread)
    assert spy.removes == 1 and not waiter.registered  # ... and stops listening, no spinning
    assert a.recv(10) == b"2"
    asyncio.get_running_loop().call_soon(b.send, b"3")
    assert await read(waiter, a, None) == b"3"  # registered again
    assert spy.adds == 2
    waiter.release()


async def test_a_wait_times_out_at_its_own_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    waiter, _ = reader(a)
    asyncio.get_running_loop().call_soon(b.send, b"x")
    assert await read(waiter, a, 30) == b"x"  # leaves a timer set 30 s out
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        await read(waiter, a, 0.05)  # a shorter limit than the timer's: it is moved earlier
    assert 0.04 <= time.monotonic() - began < 5
    waiter.release()


async def test_a_renewed_wait_is_not_cut_by_an_older_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    waiter, _ = reader(a)
    loop = asyncio.get_running_loop()
    loop.call_soon(b.send, b"x")
    assert await read(waiter, a, 0.05) == b"x"  # its timer stays set for 50 ms from now
    loop.call_later(0.2, b.send, b"y")  # later than the first deadline, within the second
    # The old timer fires at 50 ms, finds a later deadline and follows it: no TimeoutError.
    assert await read(waiter, a, 5) == b"y"
    assert waiter.timer is not None  # set for the last wait's deadline, not yet due
    waiter.release()
    assert waiter.timer is None
