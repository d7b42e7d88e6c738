"""The engine's asyncio and uvloop I/O pieces, on a socketpair.

- `SendBatch`: sends held to the end of the loop's pass, and what it leaves behind. The
  engine's own use of it is tested end to end in test_server.py and test_tls.py (responses
  the socket does not take in one send).
- `_LoopWaiter`: waits that keep their registration and their deadline; the timers are real
  (short), because they are the loop's own. `_Deadlines`: the loop's one timer for them all.

About asyncio and uvloop (trio has neither: its writers send at once and its waits are
anyio's), so these run on those two.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time

import pytest

from meshcore._http._loop import _LoopWaiter, loop_deadlines, send_batch, server_socket
from meshcore._http._socket import Socket

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


async def _never(timeout: float | None = None) -> None:
    raise AssertionError("the batch never waits")


def direct(sock: socket.socket) -> Socket:
    return Socket(sock, _never, _never, batch=send_batch(asyncio.get_running_loop()))


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
    from meshcore._http import _loop

    count = len(_loop._batches)
    del loop, other
    gc.collect()
    assert len(_loop._batches) <= count - 2  # the batch did not keep its loop alive


# _LoopWaiter -----------------------------------------------------------------------------------


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


def reader(sock: socket.socket, grace: bool = False) -> tuple[_LoopWaiter, Spy]:
    loop = asyncio.get_running_loop()
    spy = Spy(loop)
    return _LoopWaiter(loop, spy.add, spy.remove, sock, persistent=True, grace=grace), spy


async def test_the_registration_stays_between_waits(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    waiter, spy = reader(a)
    for _ in range(5):
        asyncio.get_running_loop().call_soon(b.send, b"x")
        assert await read(waiter, a, 5) == b"x"
    assert (spy.adds, spy.removes) == (1, 0)  # one registration for five waits
    waiter.release()
    assert (spy.adds, spy.removes) == (1, 1) and waiter.armed is None


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


async def test_an_accepted_connection_keeps_listening_through_one_report(pair) -> None:  # type: ignore[no-untyped-def]
    """An accepted connection's reader (`grace`): bytes that come while its task is busy, read
    before the loop reports them a second time, cost no registration change (the loop's
    reports called directly: which of a pass's callbacks runs first differs between asyncio
    and uvloop). A client connection's reader stops at the first report (the test above)."""
    a, b = pair
    waiter, spy = reader(a, grace=True)
    for _ in range(3):
        asyncio.get_running_loop().call_soon(b.send, b"x")
        assert await read(waiter, a, None) == b"x"
        waiter._ready()  # one report with nobody waiting: still listening
        assert waiter.registered and spy.removes == 0
    waiter._ready()  # a second one since the last wait: stops listening
    assert not waiter.registered and spy.removes == 1
    asyncio.get_running_loop().call_soon(b.send, b"y")
    assert await read(waiter, a, None) == b"y"  # registered again
    assert spy.adds == 2
    waiter.release()


async def test_only_accepted_connections_get_the_grace(pair) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    io = server_socket(a)
    assert io.wait_readable.__self__.grace  # type: ignore[attr-defined]  # a bound _LoopWaiter.wait
    assert not io.wait_writable.__self__.grace  # type: ignore[attr-defined]  # a bound _LoopWaiter.wait


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
    assert waiter.armed is not None  # armed for the last wait's deadline, not yet due
    waiter.release()
    assert waiter.armed is None


# _Deadlines ------------------------------------------------------------------------------------


async def test_waiters_time_out_each_at_its_own_deadline_on_one_timer() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        waiters = [reader(a)[0] for a, _ in pairs]
        results: list[tuple[int, str]] = []

        async def wait(i: int, timeout: float) -> None:
            a = pairs[i][0]
            a.setblocking(False)
            try:
                await read(waiters[i], a, timeout)
                results.append((i, "read"))
            except TimeoutError:
                results.append((i, "timeout"))

        loop = asyncio.get_running_loop()
        loop.call_later(0.15, pairs[1][1].send, b"x")  # the middle one gets bytes in time
        await asyncio.gather(wait(0, 0.05), wait(1, 5), wait(2, 0.3))
        assert results == [(0, "timeout"), (1, "read"), (2, "timeout")]
        deadlines = loop_deadlines(loop)
        assert waiters[1].armed is not None and deadlines.timer is not None  # 5 s, still due
        for waiter in waiters:
            waiter.release()
        assert all(waiter.armed is None for waiter in waiters)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_released_waiters_do_not_pile_up(pair) -> None:  # type: ignore[no-untyped-def]
    """A client that opens and closes connections leaves a stale entry per connection until
    the heap is rebuilt: it stays within twice the waiters armed (plus the slack of 64)."""
    a, _ = pair
    loop = asyncio.get_running_loop()
    deadlines = loop_deadlines(loop)
    kept = []
    for i in range(2000):
        waiter = _LoopWaiter(loop, lambda fd, cb: None, lambda fd: None, a, persistent=True)
        deadlines.arm(waiter, loop.time() + 60)
        if i % 100 == 0:
            kept.append(waiter)  # a few stay armed
        else:
            waiter.release()
        assert len(deadlines.heap) <= 2 * len(kept) + 130
    for waiter in kept:
        waiter.release()
    assert all(waiter.armed is None for waiter in kept)


async def test_an_earlier_deadline_after_a_later_one_still_fires(pair) -> None:  # type: ignore[no-untyped-def]
    """Arming a waiter earlier leaves its later entry stale; the timer is set for the earlier
    one, and the stale one, when its time comes, does nothing."""
    a, _ = pair
    loop = asyncio.get_running_loop()
    deadlines = loop_deadlines(loop)
    expired: list[str] = []
    sentinel_came = asyncio.Event()

    class Counted(_LoopWaiter):
        __slots__ = ("name",)

        def expire(self, now: float) -> None:
            expired.append(self.name)
            if self.name == "sentinel":
                sentinel_came.set()

    def counted(name: str) -> Counted:
        waiter = Counted(loop, lambda fd, cb: None, lambda fd: None, a, persistent=True)
        waiter.name = name
        return waiter

    waiter = counted("waiter")
    late, early = loop.time() + 0.1, loop.time() + 0.02
    deadlines.arm(waiter, late)
    deadlines.arm(waiter, early)
    assert deadlines.when <= early  # the timer comes at the earlier deadline
    deadlines.arm(counted("sentinel"), late + 0.05)  # due after the stale entry's time
    await sentinel_came.wait()
    assert expired == ["waiter", "sentinel"]  # once each: the stale entry did nothing
    assert waiter.armed is None
