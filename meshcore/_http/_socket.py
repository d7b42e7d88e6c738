"""The socket contract every connection of the engine follows, and what follows it.

`Socket` is one connection as the engine drives it: `sock.recv`/`sock.send` never block
(BlockingIOError when they would; `recv` gives b"" at the end), `wait_readable(timeout)` /
`wait_writable(timeout)` wait until `sock` may be called again (TimeoutError after `timeout`
seconds; None: no limit), and `aclose()` ends it. Client and server have one I/O path, written
against this contract; what `sock` is depends on the connection:

- a `socket.socket` taken from the event loop (plain TCP on trio, asyncio and uvloop; see
  `_loop.take_socket`): one syscall per call, the loop only for waits;
- a `TLSSocket` over any of these (the engine's own TLS);
- a `StreamSocket`: any anyio byte stream the engine cannot take the socket of (a stream
  wrapped in anyio's TLS by its listener, a UNIX socket, another event loop).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio

log = logging.getLogger("meshcore.http")

Wait = Callable[[float | None], Awaitable[None]]


class SocketLike(Protocol):
    """What `Socket.sock` is: a non-blocking socket's own calls."""

    def recv(self, size: int, flags: int = 0, /) -> bytes: ...

    def send(self, data: bytes | memoryview, /) -> int: ...

    def close(self) -> None: ...


class Batch(Protocol):
    """Sends held to the end of the loop's pass (`_loop.SendBatch`)."""

    def add(self, io: Socket, data: bytes) -> None: ...


class Socket:
    """One connection: `sock`, its waits and its end (the contract: see the module).

    `stream`: the anyio stream to close at the end, or None when `sock` is ours to close (on
    asyncio and uvloop the engine holds a duplicate of the transport's descriptor).
    `pending`: bytes the transport had read before the engine took its socket. `batch`
    (asyncio and uvloop, plain sockets): the loop's `SendBatch`; a write through it leaves
    what the socket did not take in `unsent`, for the writer to send after its next yield.
    `on_close` releases the loop's registrations before the socket closes.
    """

    __slots__ = (
        "batch",
        "on_close",
        "pending",
        "sock",
        "stream",
        "unsent",
        "wait_readable",
        "wait_writable",
    )

    def __init__(
        self,
        sock: SocketLike,
        wait_readable: Wait,
        wait_writable: Wait,
        stream: anyio.abc.AnyByteStream | None = None,
        *,
        pending: bytes = b"",
        batch: Batch | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.wait_readable = wait_readable
        self.wait_writable = wait_writable
        self.stream = stream
        self.pending = pending
        self.batch = batch
        self.on_close = on_close
        self.unsent: bytes | memoryview | None = None

    def take_unsent(self) -> bytes | memoryview:
        """What the batch could not send (the caller sends it, with its own limits)."""
        data, self.unsent = self.unsent, None
        assert data is not None
        return data

    async def aclose(self) -> None:
        if self.on_close is not None:
            self.on_close()
        if self.stream is None:
            self.sock.close()
        else:
            await close_stream(self.stream)


async def send_all(io: Socket, data: bytes | memoryview, timeout: float | None) -> None:
    """Send all of `data`; `timeout` bounds each wait for the socket to take more (so it is
    the time between two sends that succeed), and costs nothing when no wait is needed."""
    sock = io.sock
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent >= len(data):
        return
    view = memoryview(data)[sent:]
    wait = io.wait_writable
    while view:
        await wait(timeout)
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            pass


def recv_now(sock: SocketLike, size: int) -> bytes | None:
    """`sock.recv(size)`, or None when that would block. Why not catch BlockingIOError in the
    caller: an exception's traceback gives each frame it passes through a frame object
    (~0.27 KiB), which a coroutine then keeps for as long as it lives: an idle connection's
    `read_head`. Raised here, it passes through this frame only, which is gone after."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None


async def receive(io: Socket, size: int, timeout: float | None) -> bytes:
    """The next bytes, waiting at most `timeout` for them (TimeoutError); b"" at the end."""
    sock = io.sock
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await io.wait_readable(timeout)


class StreamSocket:
    """Any anyio byte stream with the socket contract, so it takes the engine's one I/O path.

    `recv` hands out what the last `wait_readable` received (BlockingIOError when nothing is
    there); `send` keeps the bytes and raises BlockingIOError, `wait_writable` sends them, and
    the writer's next `send` of the same bytes reports them taken (the `TLSSocket` protocol).
    A peek (`flags`, the pool's liveness check) sees what is already received, then looks at
    `peek`, the socket under the stream when there is one (a stream has no peek of its own).
    """

    __slots__ = ("buffer", "eof", "owed", "peek", "stash", "stream")

    def __init__(self, stream: anyio.abc.AnyByteStream, peek: SocketLike | None = None) -> None:
        self.stream = stream
        self.peek = peek
        self.buffer = b""
        self.eof = False
        self.stash: bytes | None = None
        self.owed = 0

    def recv(self, size: int, flags: int = 0, /) -> bytes:
        buffer = self.buffer
        if buffer:
            if flags:
                return buffer[:size]
            if len(buffer) <= size:
                self.buffer = b""
                return buffer
            self.buffer = buffer[size:]
            return buffer[:size]
        if self.eof:
            return b""
        if flags and self.peek is not None:
            return self.peek.recv(size, flags)
        raise BlockingIOError

    def send(self, data: bytes | memoryview, /) -> int:
        owed = self.owed
        if owed:  # the retry after `wait_writable` sent these bytes
            self.owed = 0
            return owed
        if not data:
            return 0
        self.stash = bytes(data)
        raise BlockingIOError

    async def wait_readable(self, timeout: float | None = None) -> None:
        if self.buffer or self.eof:
            return
        try:
            with anyio.fail_after(timeout):
                self.buffer = await self.stream.receive()
        except anyio.EndOfStream:
            self.eof = True

    async def wait_writable(self, timeout: float | None = None) -> None:
        data = self.stash
        if data is None:
            return
        with anyio.fail_after(timeout):
            await self.stream.send(data)
        self.stash = None
        self.owed = len(data)

    def close(self) -> None:
        """Nothing to do: `Socket.aclose` closes the stream."""


def adapt(stream: anyio.abc.AnyByteStream, peek: SocketLike | None = None) -> Socket:
    """A `Socket` over `stream`, whatever it is (`StreamSocket`; `peek`: see there)."""
    sock = StreamSocket(stream, peek)
    return Socket(sock, sock.wait_readable, sock.wait_writable, stream)


# Ciphertext read per `recv` on a TLS connection: a full TLS record (16 KiB plus overhead).
_TLS_READ = 17 * 1024


class TLSSocket:
    """TLS over a socket that follows the contract, with the same contract (`recv` and `send`
    raise BlockingIOError when they would block, `recv` returns b"" at the end), so the
    engine's one path and the loop's SendBatch serve TLS connections as they serve plain TCP.

    An `ssl.SSLObject` between two memory BIOs, as in anyio's TLS stream and asyncio's SSL
    protocol, driven by a few C calls per read or write instead of through a stream's layers.
    `ssl` is the SSLObject (peer certificate, cipher, ALPN).

    Sending: the ciphertext of a `send` the socket did not take at once is kept (`backlog`)
    and that `send` reports 0 bytes taken; the caller waits for the socket and calls `send`
    again with the same bytes, which pushes the backlog and then reports them all taken (they
    were encrypted the first time: `owed`). A plaintext byte is reported sent only once its
    ciphertext is in the kernel, so a writer never moves on to reading while its request is
    still in our buffer. A peer's end without close_notify ends the stream like one with it
    (anyio's `standard_compatible=False`): HTTP/1.1 frames its messages itself.
    """

    __slots__ = ("backlog", "incoming", "outgoing", "owed", "sock", "ssl")

    def __init__(
        self,
        sock: SocketLike,
        ssl_context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None,
    ) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = ssl_context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.backlog = b""
        self.owed = 0

    def recv(self, size: int, flags: int = 0, /) -> bytes:
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

    def send(self, data: bytes | memoryview, /) -> int:
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
    io: Socket,
    ssl_context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
) -> ssl.SSLObject:
    """Make `io` a TLS connection (its `sock` becomes a `TLSSocket`) and run the handshake;
    returns the SSLObject. Bytes the transport had already read (`pending`, a ClientHello on
    a server) go to TLS first. Bound the time from outside (a cancel scope); a failed
    handshake raises `ssl.SSLError`, or OSError / EndOfStream if the peer left."""
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


async def close_stream(stream: Any) -> None:
    """Close an anyio stream, bounded and shielded: a TLS close_notify to a dead peer must not
    hang or be cancelled half-way, and closing happens on paths that are already unwinding."""
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + 1.0
        try:
            await stream.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("closing a connection failed: %r", exc)
