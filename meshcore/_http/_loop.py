"""Everything the engine takes from inside anyio, asyncio, uvloop and trio, in one place.

- `backend_clock` and `backend_checkpoint`: the running backend's own clock and yield, fetched
  once per connection (anyio looks the backend up on every call of its public ones).
- `take_socket`: the socket under an anyio TCP stream, for the engine to call directly (on
  asyncio and uvloop the transport's descriptor is duplicated and the transport closed).
- `SendBatch`: sends held to the end of the asyncio loop's pass.
- `_LoopWaiter` (asyncio, uvloop) and `_trio_wait` (trio): waits that carry their own limit;
  `_TrioSockets` and `_EpollWait`: an accepted connection's waits on trio, parked with trio's
  epoll manager directly, their limit the deadline of the connection's own cancel scope.
- `Acceptor` and `server_socket`: a listener's connections accepted in batches straight from
  its socket, each driven as a `Socket` without an anyio stream or a transport in between.
- `task_group`: the backend's own task group (asyncio's `TaskGroup`, a trio nursery) for one
  task per connection.

Each reach into a private name is guarded by tests/engine/test_loop_internals.py (trio's epoll
manager: tests/engine/test_trio_waits.py), which fails when the name moves. At run time a moved internal is not silent either: the engine logs a
warning once (`_drifted`) and falls back to the public API (anyio's clock and checkpoint, the
stream through `_socket.StreamSocket`), slower but correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import math
import os
import socket
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel

from ._socket import Socket, adapt

log = logging.getLogger("meshcore.http")
_warned: set[str] = set()


def _drifted(what: str, exc: BaseException) -> None:
    """An internal this module relies on moved: say so once, the caller falls back."""
    if what not in _warned:
        _warned.add(what)
        log.warning(
            "meshcore's HTTP engine falls back to anyio's public API for %s (%r): an anyio, "
            "asyncio, uvloop or trio internal it uses moved (meshcore/_http/_loop.py)",
            what,
            exc,
        )


def _backend_module() -> str:
    """The module of the running anyio backend class (`anyio._backends._trio`, ...)."""
    from anyio._core._eventloop import get_async_backend

    return get_async_backend().__module__


def backend_clock() -> Callable[[], float]:
    """The running backend's clock: `anyio.current_time` without its per-call backend lookup
    (the same clock: trio's, which `MockClock` drives, or the loop's). From async context."""
    try:
        if _backend_module() == "anyio._backends._trio":
            import trio

            return trio.current_time  # what anyio's trio backend calls
        return asyncio.get_running_loop().time  # what anyio's asyncio backend calls
    except (ImportError, AttributeError, RuntimeError) as exc:
        _drifted("the clock", exc)
        return anyio.current_time


@types.coroutine
def _yield_to_loop() -> Any:
    """What `asyncio.sleep(0)` does (a bare yield: the task runs again on the loop's next
    pass, and a cancellation lands here), two frames less."""
    yield


def backend_checkpoint() -> Callable[[], Awaitable[None]]:
    """`anyio.lowlevel.checkpoint` without its per-call backend lookup (the engine yields twice
    per proxied request). From async context."""
    try:
        if _backend_module() == "anyio._backends._trio":
            import trio

            return trio.lowlevel.checkpoint  # what anyio's trio backend awaits
        asyncio.get_running_loop()
        return _yield_to_loop
    except (ImportError, AttributeError, RuntimeError) as exc:
        _drifted("the checkpoint", exc)
        return anyio.lowlevel.checkpoint


class SendBatch:
    """Sends held until the end of the event loop's pass, then made one after the other.

    Why: on loopback every `send` wakes the peer's process, and waking a CPU that went idle is
    what costs on a virtual machine; sends made back to back find the peer awake (a quarter
    less CPU per request in the sidecar: docs/data-path.md, "Figures").

    The contract, for a writer that hands over `data` with `add(io, data)`: the writer yields
    to the loop (a bare checkpoint) before it uses the connection again, and then sends
    `io.unsent` itself if that is set. `flush` runs before that yield returns (it was queued
    first: asyncio and uvloop run callbacks in order), and tries each send once: what the
    socket did not take, or a send that failed, is left in `unsent`, so waiting for the socket,
    its time limit and the error all stay with the connection's own task. A writer that closes
    the connection right after writing sends at once instead.
    """

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: list[tuple[Socket, bytes]] = []
        # Weakly: a batch must not keep its loop (the key of `_batches`) alive. Not looked up
        # per pass either: on CPython 3.11 `get_running_loop()` makes a getpid system call.
        self.loop = weakref.ref(loop)

    def add(self, io: Socket, data: bytes) -> None:
        """Send `data` on `io` at the end of this pass of the loop (see the class)."""
        if not self.queue:
            loop = self.loop()
            assert loop is not None  # a connection of the loop is using it
            loop.call_soon(self.flush)  # once per pass
        self.queue.append((io, data))

    def flush(self) -> None:
        queue, self.queue = self.queue, []
        for io, data in queue:
            try:
                sent = io.sock.send(data)
            except OSError:  # would block, or failed: the owner's own send finds out which
                sent = 0
            if sent < len(data):
                io.unsent = memoryview(data)[sent:] if sent else data


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SendBatch] = (
    weakref.WeakKeyDictionary()
)


def send_batch(loop: asyncio.AbstractEventLoop) -> SendBatch:
    """The running loop's `SendBatch` (one per loop, so one flush per pass of the loop)."""
    batch = _batches.get(loop)
    if batch is None:
        batch = _batches[loop] = SendBatch(loop)
    return batch


def _trio_wait(wait: Callable[[Any], Awaitable[None]], sock: object) -> Callable[..., Any]:
    """`wait(sock)` on trio with an optional time limit: a cancel scope only when there is
    one, and trio's own (anyio's wrapper scope around it costs several µs per wait;
    docs/data-path.md, "Figures")."""
    _TrioWait.use_trio()
    return _TrioWait(wait, sock, None)


class _TrioWait:
    """`_trio_wait`'s wait: an object of three slots rather than a closure and its cells,
    two per connection (docs/data-path.md, "Connection bursts and idle connections").

    With `scope`, the connection's own cancel scope (the sidecar's listeners cancel a
    connection through it), a wait's limit is that scope's deadline, set for the wait and
    cleared after it, rather than a `move_on_after` scope of its own: entering a scope costs
    trio ~0.7 KiB (its cancel status and two sets) for as long as the wait lasts, which for an
    idle connection is as long as it lives. A scope whose deadline passed stays cancelled, so
    after a TimeoutError the connection can only end: send at once what it still has to say
    (a 408), and close; a wait after that raises at once. A cancellation of the scope while
    its deadline is still ahead is a cancellation (trio.Cancelled), not a timeout.
    """

    __slots__ = ("scope", "sock", "wait")
    trio: Any = None  # the module, once a trio wait was made (no import per wait)

    @classmethod
    def use_trio(cls) -> None:
        import trio

        cls.trio = trio

    def __init__(
        self, wait: Callable[[Any], Awaitable[None]], sock: object, scope: Any
    ) -> None:
        self.wait = wait
        self.sock = sock
        self.scope = scope

    def _park(self) -> Awaitable[None]:
        """The wait itself: its coroutine, awaited by `__call__` (no frame of this method's)."""
        return self.wait(self.sock)

    async def __call__(self, timeout: float | None = None) -> None:
        if timeout is None:
            await self._park()
            return
        trio = self.trio
        scope = self.scope
        if scope is None:
            # A deadline already past is a limit of 0 (trio refuses a negative one).
            with trio.move_on_after(timeout if timeout > 0 else 0) as own:
                await self._park()
            if own.cancelled_caught:
                raise TimeoutError
            return
        clock = trio.current_time
        deadline = scope.deadline = clock() + timeout
        try:
            await self._park()
        except trio.Cancelled:
            if deadline > clock():
                raise  # cancelled, not timed out
            raise TimeoutError from None
        finally:
            scope.deadline = math.inf
        if scope.cancel_called and deadline <= clock():
            raise TimeoutError  # ready as the deadline passed: the scope is cancelled now

    def release(self) -> None:
        """Tell trio the socket closes (trio must hear of it first: it may reuse the number)."""
        self.trio.lowlevel.notify_closing(self.sock)


class _EpollWait(_TrioWait):
    """A `_TrioWait` that registers with trio's epoll I/O manager itself, as the manager's
    `wait_readable` does (`_epoll_wait`), and parks with `wait_task_rescheduled`: a waiting
    connection's await chain is then this frame and trio's trap, where through
    `trio.lowlevel.wait_readable` it is four frames and a closure (~0.6 KiB more per idle
    connection; docs/data-path.md, "Connection bursts and idle connections"). `attr`: the
    manager's waiter slot this wait takes, per class (`_EpollWriter`)."""

    __slots__ = ("manager",)
    attr = "read_task"

    def __init__(self, manager: Any, sock: socket.socket, scope: Any) -> None:
        super().__init__(_unused_wait, sock, scope)
        self.manager = manager

    def _register(self) -> Callable[[Any], Any]:
        """What `_epoll_wait` does before it parks: take the waiter slot, update epoll (so a
        `BusyResourceError` is raised from the `await`, as trio's own)."""
        manager = self.manager
        fd = self.sock.fileno()  # type: ignore[attr-defined]  # a socket
        waiters = manager._registered[fd]
        if getattr(waiters, self.attr) is not None:
            raise self.trio.BusyResourceError("another task is already reading / writing this fd")
        setattr(waiters, self.attr, self.trio.lowlevel.current_task())
        manager._update_registrations(fd)
        return self._abort

    def _abort(self, _: Any) -> Any:
        """`_epoll_wait`'s abort: give the slot back (a cancellation)."""
        manager = self.manager
        fd = self.sock.fileno()  # type: ignore[attr-defined]  # a socket
        setattr(manager._registered[fd], self.attr, None)
        manager._update_registrations(fd)
        return self.trio.lowlevel.Abort.SUCCEEDED

    def _park(self) -> Awaitable[None]:
        park: Awaitable[None] = self.trio.lowlevel.wait_task_rescheduled(self._register())
        return park


class _EpollWriter(_EpollWait):
    __slots__ = ()
    attr = "write_task"


async def _unused_wait(sock: Any) -> None:  # pragma: no cover  # `_EpollWait` parks itself
    raise AssertionError("unused")


async def socket_for(stream: anyio.abc.AnyByteStream) -> Socket:
    """The `Socket` the engine drives `stream` with: its own socket when `take_socket` can
    have it, else the stream itself (`adapt_stream`)."""
    io = await take_socket(stream)
    return adapt_stream(stream) if io is None else io


def adapt_stream(stream: anyio.abc.AnyByteStream) -> Socket:
    """`stream` through `StreamSocket`, which peeks (the pool's liveness check) at the socket
    under the stream: on asyncio the one inside the transport's `TransportSocket` wrapper,
    which refuses `recv` itself."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    raw = getattr(raw, "_sock", raw)
    if isinstance(raw, socket.socket):
        return adapt(stream, raw)
    if type(raw).__module__ == "uvloop.loop":  # a `PseudoSocket`: no recv() of its own
        return adapt(stream, _FdPeek(raw))
    return adapt(stream, None)


class _FdPeek:
    """The pool's liveness peek at a socket known by its descriptor only: uvloop's transport
    sockets (`PseudoSocket`) refuse `recv`, and anyio pauses the transport's reading between
    receives, so without a peek at the socket itself a server's close of an idle connection
    went unseen and the next request (a POST, which is never resent) failed on it. A socket
    object is made on the descriptor for the one call and detached, the transport keeps
    owning it; a closed transport's descriptor (-1) reads as the end."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def recv(self, size: int, flags: int = 0, /) -> bytes:
        fd = self.raw.fileno()
        if fd < 0:
            return b""
        sock = socket.socket(fileno=fd)
        try:
            return sock.recv(size, flags)
        finally:
            sock.detach()

    def send(self, data: bytes | memoryview, /) -> int:
        raise OSError("a peek only")

    def close(self) -> None:
        """Nothing: the transport owns the descriptor."""


async def take_socket(stream: Any) -> Socket | None:
    """A `Socket` on the socket of a plain TCP stream on trio, asyncio or uvloop, else None.

    None (the stream is used as it is) under TLS, for UNIX sockets on asyncio and for other
    event loops. On asyncio and uvloop the transport's reading is paused before its
    descriptor is duplicated and the transport aborted: pausing takes the descriptor out of
    epoll (and libuv unregisters it when closing), so the closed original never lingers in the
    epoll set while our duplicate keeps the connection open. On trio the stream keeps its
    socket (trio keeps no buffer in front of it) and closes it at the end.
    """
    module = type(stream).__module__
    if module == "anyio._backends._trio":
        if not isinstance(stream, anyio.abc.SocketStream):
            return None
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
            return None
        try:
            from anyio._core._eventloop import get_async_backend

            backend = get_async_backend()
            waits = _trio_wait(backend.wait_readable, sock), _trio_wait(backend.wait_writable, sock)
        except (ImportError, AttributeError) as exc:
            _drifted("trio's socket waits", exc)
            return None
        return Socket(sock, *waits, stream)
    if module != "anyio._backends._asyncio" or type(stream).__name__ != "SocketStream":
        return None
    try:
        import asyncio.selector_events

        transport = stream._transport
        protocol = stream._protocol
        if transport.is_closing() or protocol.is_at_eof or protocol.exception is not None:
            return None
        raw = transport.get_extra_info("socket")
        if isinstance(transport, asyncio.selector_events._SelectorSocketTransport):  # type: ignore[attr-defined]  # private to asyncio; guarded by test_loop_internals
            raw = raw._sock  # asyncio's TransportSocket wrapper refuses recv()
        elif type(transport).__module__ != "uvloop.loop":
            return None
        if raw.type != socket.SOCK_STREAM or raw.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        queue = protocol.read_queue
    except (ImportError, AttributeError) as exc:
        _drifted("asyncio's transport", exc)
        return None
    # Stop the transport's reading first: the descriptor leaves epoll before it is
    # closed (a closed descriptor whose duplicate lives on would otherwise stay in it).
    transport.pause_reading()
    try:
        sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
    except OSError:  # out of descriptors, say: the stream stays as it was
        transport.resume_reading()
        return None
    pending = b"".join(queue)
    queue.clear()
    sock.setblocking(False)
    try:
        await stream.aclose()  # aborts the transport, which closes its descriptor, not ours
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    reader = _LoopWaiter(loop, loop.add_reader, loop.remove_reader, sock, persistent=True)
    # A socket is nearly always writable: a writer registration kept would fire on every pass.
    writer = reader.then = _LoopWaiter(
        loop, loop.add_writer, loop.remove_writer, sock, persistent=False
    )
    return Socket(
        sock, reader.wait, writer.wait, pending=pending, batch=send_batch(loop),
        on_close=reader.release,
    )


class _Deadlines:
    """The time limits of every `_LoopWaiter` on one loop, on one loop timer.

    A timer handle per waiting connection is ~0.6 KiB (uvloop's `TimerHandle` and its libuv
    timer) for as long as the connection idles (docs/data-path.md, "Connection bursts and idle
    connections"); an entry here is a tuple in a heap. Entries are never removed in place (that
    is a scan of the heap): a waiter that is armed earlier, or released, leaves its old entry
    stale (`_LoopWaiter.armed` no longer matches it), the timer skips stale entries when their
    time comes, and once they are more than half of the heap it is rebuilt without them, so a
    client opening and closing connections cannot make it grow past twice the waiters armed.
    """

    __slots__ = ("heap", "loop", "stale", "timer", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, _LoopWaiter]] = []
        self.stale = 0
        self.timer: asyncio.TimerHandle | None = None
        self.when = math.inf

    def arm(self, waiter: _LoopWaiter, deadline: float) -> None:
        """Call `waiter.expire()` at `deadline` (its entry before this one goes stale)."""
        if waiter.armed is not None:
            waiter.armed = None  # (before a rebuild, which then drops its old entry)
            self._went_stale()
        waiter.armed = deadline
        heapq.heappush(self.heap, (deadline, waiter))
        if deadline < self.when:
            self._set(deadline)

    def disarm(self, waiter: _LoopWaiter) -> None:
        if waiter.armed is not None:
            waiter.armed = None
            self._went_stale()

    def _went_stale(self) -> None:
        self.stale += 1
        if self.stale > 64 and self.stale * 2 > len(self.heap):
            seen: set[_LoopWaiter] = set()
            live = []
            for entry in self.heap:
                deadline, waiter = entry
                if waiter.armed == deadline and waiter not in seen:
                    seen.add(waiter)
                    live.append(entry)
            heapq.heapify(live)
            self.heap, self.stale = live, 0
            if not live and self.timer is not None:
                self.timer.cancel()
                self.timer, self.when = None, math.inf

    def _set(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._fire)
        self.when = when

    def _fire(self) -> None:
        self.timer, self.when = None, math.inf
        heap = self.heap
        now = self.loop.time()
        while heap and heap[0][0] <= now:
            deadline, waiter = heapq.heappop(heap)
            if waiter.armed != deadline:
                self.stale -= 1
                continue
            waiter.armed = None
            waiter.expire(now)  # may arm it again, for a later deadline
        if heap:
            self._set(heap[0][0])
        # else: nothing is armed; the next `arm` sets the timer


_deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)


def loop_deadlines(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    """The loop's `_Deadlines` (one per loop)."""
    found = _deadlines.get(loop)
    if found is None:
        found = _deadlines[loop] = _Deadlines(loop)
    return found


class _LoopWaiter:
    """Waits for one socket to become readable (or writable) on an asyncio or uvloop loop, for
    one task at a time (the connection's): `wait(timeout)`, raising TimeoutError when the time
    is up: what `anyio.wait_readable` in `anyio.fail_after` does, without the cancel scope,
    and without paying again on every wait for what can stay (a proxy waits on nearly every
    upstream read when the upstream takes a millisecond; docs/data-path.md, "Figures"):

    - **The registration stays** (`persistent`, readers) from one wait to the next, sparing
      two `epoll_ctl` calls per wait. It ends when the socket turns readable while nobody
      waits (the epoll set is level-triggered: the callback would run on every pass until the
      task reads), and at `release()`, which must run before the socket is closed. An
      accepted connection's reader (`grace`) keeps it through the first such report since its
      last wait: a keep-alive client's next request mostly comes while the task is still at
      its checkpoint and is read within the pass, and dropping the registration there costs
      uvloop a poll handle's whole cycle (about six `epoll_ctl`) for the next wait. Not a
      client connection's: there it made a sequential native client sleep in `epoll_wait`
      more often and wait longer (docs/data-path.md, "Fifth pass").
    - **The deadline stays armed too** (`armed`, in the loop's `_Deadlines`). A wait records
      its deadline; the entry armed comes due at the earliest deadline it was set for and, if
      the wait then running has a later one (it was renewed since), is armed again for that.
      So a connection waiting every millisecond with a 60 s limit is armed about once a
      minute instead of once per wait.
    """

    __slots__ = (
        "add",
        "armed",
        "deadline",
        "deadlines",
        "fd",
        "future",
        "grace",
        "idle_reports",
        "loop",
        "persistent",
        "registered",
        "remove",
        "then",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        add: Callable[..., Any],
        remove: Callable[[Any], Any],
        sock: socket.socket,
        persistent: bool,
        grace: bool = False,
    ) -> None:
        self.loop = loop
        self.add = add
        self.remove = remove
        self.fd = sock.fileno()
        self.persistent = persistent
        self.grace = grace
        self.idle_reports = 0  # readable with nobody waiting, since the last wait
        self.registered = False
        self.future: asyncio.Future[None] | None = None
        self.deadline: float | None = None
        self.deadlines = loop_deadlines(loop)
        self.armed: float | None = None
        # Another waiter `release()` releases too (a socket's writer, its reader's `then`):
        # one bound method for `Socket.on_close` instead of a closure per connection.
        self.then: _LoopWaiter | None = None

    def __lt__(self, other: object) -> bool:
        return False  # heap entries with equal deadlines: any order will do

    async def wait(self, timeout: float | None = None) -> None:
        loop = self.loop
        future = self.future = loop.create_future()
        self.idle_reports = 0
        if not self.registered:
            self.add(self.fd, self._ready)
            self.registered = True
        if timeout is None:
            self.deadline = None
        else:
            deadline = self.deadline = loop.time() + timeout
            armed = self.armed
            if armed is None or armed > deadline:
                self.deadlines.arm(self, deadline)
        try:
            await future
        finally:
            self.future = None
            if not self.persistent and self.registered:
                self.remove(self.fd)
                self.registered = False

    def _ready(self) -> None:
        future = self.future
        if future is None:  # readable with nobody waiting: stop listening until the next wait
            if self.grace and not self.idle_reports:  # (an accepted connection: the second time)
                self.idle_reports = 1
            else:
                self.remove(self.fd)
                self.registered = False
        elif not future.done():
            future.set_result(None)

    def expire(self, now: float) -> None:
        """The armed deadline came (`_Deadlines`)."""
        future, deadline = self.future, self.deadline
        if future is None or deadline is None or future.done():
            return  # nobody waits, or with no limit: the deadline lapses
        if deadline > now:  # the wait running now was set later: follow it
            self.deadlines.arm(self, deadline)
            return
        future.set_exception(TimeoutError())

    def release(self) -> None:
        """Stop listening and drop the deadline; before the socket closes."""
        if self.registered:
            self.registered = False
            self.remove(self.fd)
        if self.armed is not None:
            self.deadlines.disarm(self)
        if self.then is not None:
            self.then.release()


class MakeSocket(Protocol):
    """`Acceptor.socket`: an accepted socket's `Socket`; `scope`: on trio, the connection's
    cancel scope, whose deadline the waits then use for their limits (`_TrioWait`)."""

    def __call__(self, sock: socket.socket, scope: Any = None, /) -> Socket: ...


# Connections accepted in a row before the loop serves others: HAProxy's `tune.maxaccept`
# (64), so a burst is taken in a few passes and established connections still get theirs.
MAX_ACCEPT = 64


class Acceptor:
    """Accepts a listening socket's connections in batches: one wait for readiness, then
    `accept()` until the backlog is empty or `MAX_ACCEPT` (Envoy's
    `max_connections_to_accept_per_socket_event`, HAProxy's `tune.maxaccept`).

    Why: anyio's `accept()` takes one connection per pass of the loop and builds a stream
    (asyncio: a transport and a protocol, which `take_socket` then takes apart again); under
    load a burst of new connections waited seconds behind the established ones
    (docs/data-path.md, "Connection bursts and idle connections"). Cancel a `wait()` before
    closing the socket (on trio a close under it raises OSError; asyncio would not wake it),
    and `release()` the acceptor then.
    """

    __slots__ = ("sock", "wait", "release", "kind", "socket")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        # `socket.accept` looks these up as enums on every call (a tenth of a µs each).
        self.kind = (int(sock.family), int(sock.type), sock.proto)
        trio_backend = _backend_module() == "anyio._backends._trio"
        # `socket(accepted, scope)`: the accepted socket's `Socket`, for the backend found once
        # here (`scope`: on trio, the connection's cancel scope, which its waits' limits use).
        self.socket: MakeSocket = (
            _TrioSockets() if trio_backend else _LoopSockets(asyncio.get_running_loop())
        )
        if trio_backend:
            import trio

            wait_readable = trio.lowlevel.wait_readable

            async def wait() -> None:
                try:
                    await wait_readable(sock)
                except trio.ClosedResourceError:
                    raise OSError("listener closed") from None

            self.wait: Callable[[], Awaitable[None]] = wait
            self.release: Callable[[], None] = _nothing
        else:
            loop = asyncio.get_running_loop()
            waiter = _LoopWaiter(loop, loop.add_reader, loop.remove_reader, sock, persistent=True)
            self.wait = waiter.wait
            self.release = waiter.release

    def accept(self, most: int) -> list[tuple[socket.socket, Any]]:
        """Up to `most` connections the backlog holds now (non-blocking, TCP_NODELAY set as
        asyncio's and trio's streams do); an empty list when it holds none."""
        accepted: list[tuple[socket.socket, Any]] = []
        accept = self.sock._accept  # type: ignore[attr-defined]  # what socket.accept calls; guarded by tests/engine/test_accept.py
        family, kind, proto = self.kind
        new = socket.socket
        while len(accepted) < most:
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # EMFILE, ECONNABORTED, ...: the caller sees it if nothing came
                if accepted:
                    break
                raise
            conn = new(family, kind, proto, fileno=fd)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            accepted.append((conn, address))
        return accepted


def _nothing() -> None:
    pass


def server_socket(sock: socket.socket) -> Socket:
    """The `Socket` for an accepted connection on the running backend (from async context;
    `Acceptor.socket` is the same, with the backend looked up once); `aclose()` closes `sock`."""
    if _backend_module() == "anyio._backends._trio":
        return _TrioSockets()(sock)
    return _LoopSockets(asyncio.get_running_loop())(sock)


class _TrioSockets:
    """Makes the `Socket` of accepted connections on trio: with `_EpollWait` where trio's I/O
    manager is the epoll one it knows (Linux), else with trio's public waits."""

    __slots__ = ("manager",)

    def __init__(self) -> None:
        _TrioWait.use_trio()
        self.manager: Any = None
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT

            manager = GLOBAL_RUN_CONTEXT.runner.io_manager
            if type(manager).__name__ == "EpollIOManager":
                manager._registered  # noqa: B018  # the internals `_EpollWait` uses
                manager._update_registrations  # noqa: B018
                self.manager = manager
        except (ImportError, AttributeError) as exc:
            _drifted("trio's I/O manager", exc)

    def __call__(self, sock: socket.socket, scope: Any = None) -> Socket:
        manager = self.manager
        if manager is None:
            lowlevel = _TrioWait.trio.lowlevel
            reader = _TrioWait(lowlevel.wait_readable, sock, scope)
            writer = _TrioWait(lowlevel.wait_writable, sock, scope)
        else:
            reader = _EpollWait(manager, sock, scope)
            writer = _EpollWriter(manager, sock, scope)
        return Socket(sock, reader, writer, on_close=reader.release)


class _LoopSockets:
    """Makes the `Socket` of accepted connections on one asyncio or uvloop loop.

    The loop's bound methods are made once here and shared: each is 64 bytes, four per
    connection otherwise (docs/data-path.md, "Connection bursts and idle connections")."""

    __slots__ = ("add_reader", "add_writer", "batch", "loop", "remove_reader", "remove_writer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.batch = send_batch(loop)
        self.add_reader = loop.add_reader
        self.remove_reader = loop.remove_reader
        self.add_writer = loop.add_writer
        self.remove_writer = loop.remove_writer

    def __call__(self, sock: socket.socket, scope: Any = None) -> Socket:
        loop = self.loop
        reader = _LoopWaiter(
            loop, self.add_reader, self.remove_reader, sock, persistent=True, grace=True
        )
        writer = reader.then = _LoopWaiter(
            loop, self.add_writer, self.remove_writer, sock, persistent=False
        )
        return Socket(sock, reader.wait, writer.wait, batch=self.batch, on_close=reader.release)


Spawn = Callable[..., None]
_TASK_NAME = "meshcore connection"


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[Spawn]:
    """`spawn(async_fn, *args)` runs `async_fn(*args)` in a task of the backend's own group,
    which the block waits for (and cancels when the block is cancelled), like an anyio task
    group.

    Why not anyio's: its `start_soon` wraps each task in a handle with an event and a cancel
    scope of its own, about 2 KiB and several µs per connection (docs/data-path.md,
    "Connection bursts and idle connections"). A spawned function must not raise (anyio's
    cancel scopes work inside these tasks as in anyio's)."""
    if _backend_module() == "anyio._backends._trio":
        import trio

        async with trio.open_nursery() as nursery:
            # One name for all: trio would otherwise make a string per task from the function.
            yield functools.partial(nursery.start_soon, name=_TASK_NAME)
        return
    async with asyncio.TaskGroup() as group:
        create_task = group.create_task

        def spawn(async_fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
            create_task(async_fn(*args))  # type: ignore[unused-awaitable]  # the group keeps it

        yield spawn
