"""Small pieces both sides of the engine share."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import types
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.tls import TLSAttribute, TLSStream

log = logging.getLogger("meshcore.http")


def backend_clock() -> Callable[[], float]:
    """The running backend's clock: `anyio.current_time` without its per-call backend lookup.

    Same clock (trio's, so `MockClock` still drives it; the loop's on asyncio), fetched once
    per connection instead of once per read: about 4 Python calls saved each time, and the
    engine reads the clock several times per request. Call it from async context.
    """
    try:
        from anyio._core._eventloop import get_async_backend

        backend = get_async_backend()
        if backend.__module__ == "anyio._backends._trio":
            import trio

            return trio.current_time  # what anyio's trio backend calls, one frame less
        return asyncio.get_running_loop().time  # what anyio's asyncio backend calls
    except (
        ImportError,
        AttributeError,
        RuntimeError,
    ):  # an anyio without the private helper: the public one
        return anyio.current_time


@types.coroutine
def _yield_to_loop() -> Any:
    """What `asyncio.sleep(0)` does (a bare yield: the task runs again on the loop's next
    pass, and a cancellation lands here), two frames less."""
    yield


def backend_checkpoint() -> Callable[[], Awaitable[None]]:
    """`anyio.lowlevel.checkpoint` without its per-call backend lookup (3 Python calls less
    on trio, 4 on asyncio, and the engine yields twice per proxied request). Call it from
    async context."""
    try:
        from anyio._core._eventloop import get_async_backend

        backend = get_async_backend()
        if backend.__module__ == "anyio._backends._trio":
            import trio

            return trio.lowlevel.checkpoint  # what anyio's trio backend awaits
        asyncio.get_running_loop()  # (asyncio or uvloop: anything else takes the public one)
        return _yield_to_loop
    except (ImportError, AttributeError, RuntimeError):
        return anyio.lowlevel.checkpoint


class DirectSocket:
    """The connection's socket, called directly: non-blocking `recv`/`send`, and a wait only
    when one would block.

    anyio's streams cost a lot per call on a plain TCP connection. On trio every `recv`/`send`
    runs through trio's socket wrapper: a context manager, a cancellation check and a scheduler
    checkpoint even when the call completes at once (about 10 µs of CPU per proxied request on
    the project's machine). On asyncio every `receive` resumes and pauses the transport's
    reading (two `epoll_ctl`) and every `send` yields to the loop once or twice. A non-blocking
    call straight on the socket costs one syscall; only when it would block do we wait, so
    cancellation stays the backend's.

    `wait_readable(timeout)` / `wait_writable(timeout)` wait until the socket is ready, at most
    `timeout` seconds (None: no limit), then raise TimeoutError: anyio's waits on trio, a
    reader callback and a loop timer on asyncio and uvloop (`_LoopWaiter`).

    `owned`: on asyncio the stream's transport owns its socket (its file descriptor may not be
    waited on by anyone else), so we take a duplicate of the descriptor, close the transport,
    and close the duplicate ourselves at the end. `pending` holds bytes the transport had
    already read. On trio the stream keeps its socket (trio keeps no buffer in front of it).

    `batch` (asyncio and uvloop; None on trio) is the loop's `SendBatch`: a write whose owner
    yields to the loop before it touches the connection again may go through it, and then
    checks `unsent` after that yield (see `SendBatch`).

    `sock` is the socket, or after `start_tls` a `TLSSocket` over it, with the same contract.
    """

    __slots__ = (
        "batch",
        "owned",
        "pending",
        "sock",
        "unsent",
        "wait_readable",
        "wait_writable",
        "waiters",
    )

    def __init__(
        self,
        sock: Any,
        wait_readable: Callable[[float | None], Awaitable[None]],
        wait_writable: Callable[[float | None], Awaitable[None]],
        owned: bool,
        *,
        pending: bytes = b"",
        batch: SendBatch | None = None,
    ) -> None:
        self.sock = sock
        self.wait_readable = wait_readable
        self.wait_writable = wait_writable
        self.owned = owned
        self.pending = pending
        self.batch = batch
        self.unsent: bytes | memoryview | None = None
        self.waiters: tuple[_LoopWaiter, ...] = ()  # asyncio's, released before closing

    def take_unsent(self) -> bytes | memoryview:
        """What the batch could not send (the caller sends it, with its own limits)."""
        data, self.unsent = self.unsent, None
        assert data is not None
        return data

    def close(self) -> None:
        for waiter in self.waiters:
            waiter.release()
        if self.owned:
            self.sock.close()


class SendBatch:
    """Sends held until the end of the event loop's pass, then made one after the other.

    Why: on loopback every `send` wakes the peer's process, and on a virtual machine waking a
    halted CPU is what costs (an interprocess interrupt; in the kernel profile, the time spent
    in `sock_def_readable`). A proxy that sends as it goes sends once per request between two
    stretches of Python, so nearly every send wakes a peer that went back to sleep; sends made
    back to back find it awake. Measured on the sidecar (uvloop, wrk -c32, 2 CPUs, interleaved
    A/B): 49.4 -> 34.6 µs of CPU per request, most of it system time (docs/data-path.md,
    "Fourth pass").

    The contract, for a writer that hands over `data` with `add(io, data)`: the writer yields
    to the loop (a bare checkpoint) before it uses the connection again, and then sends
    `io.unsent` itself if that is set. `flush` runs before that yield returns (it was queued
    first: asyncio and uvloop run callbacks in order), and tries each send once: what the
    socket did not take, or a send that failed, is left in `unsent`, so waiting for the socket,
    its time limit and the error all stay with the connection's own task. A writer that closes
    the connection right after writing sends at once instead.
    """

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: list[tuple[DirectSocket, bytes]] = []

    def add(self, io: DirectSocket, data: bytes) -> None:
        """Send `data` on `io` at the end of this pass of the loop (see the class)."""
        if not self.queue:
            # Once per pass. The loop is looked up, not kept: a batch must not keep its loop
            # (the key of `_batches`) alive.
            asyncio.get_running_loop().call_soon(self.flush)
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
        batch = _batches[loop] = SendBatch()
    return batch


def _limited(wait: Callable[[Any], Awaitable[None]], sock: object) -> Callable[..., Any]:
    """`wait(sock)` on trio with an optional time limit: a cancel scope only when there is
    one, and trio's own (with `anyio.fail_after` around the same wait, a sidecar whose upstream
    reads nearly always wait cost 77 against 65 µs of CPU per request; docs/data-path.md)."""
    import trio

    move_on_after = trio.move_on_after

    async def limited(timeout: float | None = None) -> None:
        if timeout is None:
            await wait(sock)
            return
        if timeout <= 0:  # a deadline already past (trio refuses a negative limit)
            raise TimeoutError
        with move_on_after(timeout) as scope:
            await wait(sock)
        if scope.cancelled_caught:
            raise TimeoutError

    return limited


async def take_socket(stream: Any) -> DirectSocket | None:
    """A `DirectSocket` for a plain TCP stream on trio, asyncio or uvloop, else None.

    None (the stream is used as it is) under TLS, for UNIX sockets, for other event loops and
    on an anyio without the internals used here. On asyncio and uvloop the transport's reading
    is paused before its descriptor is duplicated and the transport aborted: pausing takes the
    descriptor out of epoll (and libuv unregisters it when closing), so the closed original
    never lingers in the epoll set while our duplicate keeps the connection open.
    """
    module = type(stream).__module__
    if module == "anyio._backends._trio":
        if not isinstance(stream, anyio.abc.SocketStream):
            return None
        try:
            from anyio._core._eventloop import get_async_backend

            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
            if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
                return None
            backend = get_async_backend()
            return DirectSocket(
                sock,
                _limited(backend.wait_readable, sock),
                _limited(backend.wait_writable, sock),
                False,
            )
        except (ImportError, AttributeError, RuntimeError):
            return None
    if module != "anyio._backends._asyncio" or type(stream).__name__ != "SocketStream":
        return None
    try:
        import asyncio.selector_events

        transport = stream._transport
        protocol = stream._protocol
        if transport.is_closing() or protocol.is_at_eof or protocol.exception is not None:
            return None
        raw = transport.get_extra_info("socket")
        if isinstance(transport, asyncio.selector_events._SelectorSocketTransport):
            raw = raw._sock
        elif type(transport).__module__ != "uvloop.loop":
            return None
        if raw.type != socket.SOCK_STREAM or raw.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        # Stop the transport's reading first: the descriptor leaves epoll before it is
        # closed (a closed descriptor whose duplicate lives on would otherwise stay in it).
        transport.pause_reading()
        sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
        queue = protocol.read_queue
        pending = b"".join(queue)
        queue.clear()
    except (ImportError, AttributeError, RuntimeError, OSError):
        return None
    sock.setblocking(False)
    try:
        await stream.aclose()  # aborts the transport, which closes its descriptor, not ours
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    reader = _LoopWaiter(loop, loop.add_reader, loop.remove_reader, sock, persistent=True)
    # A socket is nearly always writable: a writer registration kept would fire on every pass.
    writer = _LoopWaiter(loop, loop.add_writer, loop.remove_writer, sock, persistent=False)
    io = DirectSocket(sock, reader.wait, writer.wait, True, pending=pending, batch=send_batch(loop))
    io.waiters = (reader, writer)
    return io


# Ciphertext read per `recv` on a TLS connection: a full TLS record (16 KiB plus overhead).
_TLS_READ = 17 * 1024


class TLSSocket:
    """TLS over a non-blocking socket, with the socket's own contract (`recv` and `send` raise
    BlockingIOError when they would block, `recv` returns b"" at the end), so the engine's
    direct paths and the loop's SendBatch serve TLS connections as they serve plain TCP.

    An `ssl.SSLObject` between two memory BIOs, as in anyio's TLS stream and asyncio's SSL
    protocol, but driven by a few C calls per read or write instead of through a stream's
    layers. `ssl` is the SSLObject (peer certificate, cipher, ALPN).

    Sending: the ciphertext of a `send` the socket did not take at once is kept (`backlog`)
    and that `send` reports 0 bytes taken; the caller waits for the socket and calls `send`
    again with the same bytes, which pushes the backlog and then reports them all taken (they
    were encrypted the first time: `owed`). A plaintext byte is reported sent only once its
    ciphertext is in the kernel, so a writer never moves on to reading while its request is
    still in our buffer. A peer's end without close_notify ends the stream like one with it
    (anyio's `standard_compatible=False`): HTTP/1.1 frames its messages itself.
    """

    __slots__ = ("backlog", "incoming", "outgoing", "owed", "sock", "ssl")

    def __init__(self, sock: socket.socket, ssl_context: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = ssl_context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.backlog = b""
        self.owed = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int, flags: int = 0) -> bytes:
        if flags:  # a peek (the pool's liveness check) looks at the socket itself
            return self.sock.recv(size, flags)
        tls = self.ssl
        incoming = self.incoming
        while True:
            # Only when TLS holds bytes: a read that cannot succeed raises, and an exception
            # costs more than these two checks.
            if incoming.pending or tls.pending():
                try:
                    data = tls.read(size)
                except ssl.SSLWantReadError:  # part of a record: more is needed
                    if self.outgoing.pending:  # and TLS has something to say first
                        self._push()
                except ssl.SSLZeroReturnError:  # close_notify
                    return b""
                else:
                    if self.outgoing.pending:  # a reply the read produced (a key update)
                        self._push()
                    return data
            raw = self.sock.recv(_TLS_READ)  # BlockingIOError when nothing came: the caller waits
            if not raw:
                return b""
            incoming.write(raw)

    def send(self, data: bytes | memoryview) -> int:
        if self.backlog or self.outgoing.pending:
            if not self._push():
                raise BlockingIOError
            owed, self.owed = self.owed, 0
            if owed:  # the retry of the send whose ciphertext just went out
                return owed
        taken = self.ssl.write(data)
        if self._push():
            return taken
        self.owed = taken
        return 0

    def _push(self) -> bool:
        """Send the ciphertext not yet sent; True when the socket took it all."""
        backlog = self.backlog
        if self.outgoing.pending:
            backlog += self.outgoing.read()
        try:
            sent = self.sock.send(backlog)
        except BlockingIOError:
            sent = 0
        self.backlog = backlog[sent:]
        return not self.backlog

    def close(self) -> None:
        """Send close_notify if the socket takes it at once, then close the socket."""
        try:
            self.ssl.unwrap()
        except (ssl.SSLError, ValueError):  # want-read (the peer's alert) or never handshaken
            pass
        try:
            if self.outgoing.pending and not self.backlog:
                self.sock.send(self.outgoing.read())
        except OSError:
            pass
        self.sock.close()


async def start_tls(
    io: DirectSocket,
    ssl_context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
) -> ssl.SSLObject:
    """Make the plain `io` a TLS connection (its `sock` becomes a `TLSSocket`) and run the
    handshake; returns the SSLObject. Bytes asyncio's transport had already read (`pending`,
    a ClientHello on a server) go to TLS first. Bound the time from outside (a cancel scope);
    a failed handshake raises `ssl.SSLError`, or OSError / EndOfStream if the peer left."""
    tls = TLSSocket(io.sock, ssl_context, server_side, server_hostname)
    if io.pending:
        tls.incoming.write(io.pending)
        io.pending = b""
    while True:
        try:
            tls.ssl.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        while not tls._push():
            await io.wait_writable(None)
        try:
            raw = tls.sock.recv(_TLS_READ)
        except BlockingIOError:
            await io.wait_readable(None)
            continue
        if not raw:
            raise anyio.EndOfStream
        tls.incoming.write(raw)
    while not tls._push():  # the last flight (and a server's session tickets)
        await io.wait_writable(None)
    io.sock = tls
    return tls.ssl


async def tls_handshake(
    stream: Any,
    io: DirectSocket | None,
    ssl_context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
) -> tuple[Any, ssl.SSLObject]:
    """TLS on a new connection, either side: on a socket the engine drives directly (`io`)
    with `start_tls`, so TLS takes the direct path too; any other stream is wrapped in anyio's
    TLS stream. Returns the stream to use from now on and the connection's SSLObject."""
    if io is not None:
        ssl_object = await start_tls(
            io, ssl_context, server_side=server_side, server_hostname=server_hostname
        )
        return stream, ssl_object
    tls = await TLSStream.wrap(
        stream,
        server_side=server_side,
        hostname=server_hostname,
        ssl_context=ssl_context,
        standard_compatible=False,
    )
    return tls, tls.extra(TLSAttribute.ssl_object)


class _LoopWaiter:
    """Waits for one socket to become readable (or writable) on an asyncio or uvloop loop, for
    one task at a time (the connection's): `wait(timeout)`, raising TimeoutError when the time
    is up. What `anyio.wait_readable` in `anyio.fail_after` does, without its context
    variable, its closures and the cancel scope (~7 µs of CPU on asyncio), and without what
    every wait would otherwise pay again:

    - **The registration stays** (`persistent`, readers) from one wait to the next. A proxy's
      upstream read waits on nearly every request when the upstream takes a millisecond to
      answer; registering and unregistering the descriptor each time is two `epoll_ctl` calls
      and a poll handle per wait. It ends when the socket turns readable while nobody waits
      (the epoll set is level-triggered: the callback would run on every pass until the task
      reads), and at `release()`, which must run before the socket is closed.
    - **The timer stays too.** A wait records its deadline; the one loop timer fires at the
      earliest deadline it was set for and, if the wait then running has a later one (it was
      renewed since), sets itself again for that. So a connection waiting every millisecond
      with a 60 s limit arms a timer about once a minute instead of once per wait.

    Measured with two sidecars in a chain (the outbound one waits for the inbound one on
    every request): 51-54 -> 41 µs of CPU per request, about half of it from each
    (docs/data-path.md).
    """

    __slots__ = ("add", "deadline", "fd", "future", "loop", "persistent", "registered", "remove",
                 "timer")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        add: Callable[..., Any],
        remove: Callable[[Any], Any],
        sock: socket.socket,
        persistent: bool,
    ) -> None:
        self.loop = loop
        self.add = add
        self.remove = remove
        self.fd = sock.fileno()
        self.persistent = persistent
        self.registered = False
        self.future: asyncio.Future[None] | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    async def wait(self, timeout: float | None = None) -> None:
        loop = self.loop
        future = self.future = loop.create_future()
        if not self.registered:
            self.add(self.fd, self._ready)
            self.registered = True
        if timeout is None:
            self.deadline = None
        else:
            deadline = self.deadline = loop.time() + timeout
            timer = self.timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self.timer = loop.call_at(deadline, self._expire)
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
            self.remove(self.fd)
            self.registered = False
        elif not future.done():
            future.set_result(None)

    def _expire(self) -> None:
        self.timer = None
        future, deadline = self.future, self.deadline
        if future is None or deadline is None or future.done():
            return  # nobody waits, or with no limit: the timer lapses
        if deadline > self.loop.time():  # the wait running now was set later: follow it
            self.timer = self.loop.call_at(deadline, self._expire)
            return
        future.set_exception(TimeoutError())

    def release(self) -> None:
        """Stop listening and drop the timer; before the socket closes."""
        if self.registered:
            self.registered = False
            self.remove(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def close_stream(stream: Any) -> None:
    """Close an anyio stream, bounded and shielded: a TLS close_notify to a dead peer must not
    hang or be cancelled half-way, and closing happens on paths that are already unwinding."""
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + 1.0
        try:
            await stream.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("closing a connection failed: %r", exc)
