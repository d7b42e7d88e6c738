"""Real loopback upstream servers with scripted behaviour: the demo's instances, and the test
kit's `upstream` fixture (`meshcore.testing.UpstreamServer` is this class: the test kit uses the
demo's app, never the other way round, and the runtime uses neither).

Each `UpstreamServer` is a real HTTP/1.1 server (asyncio + httptools) in a thread of its own,
so it is independent of the test's event loop, backend and virtual clock. Its behaviour can
be changed while it runs: status code, added delay, dropping connections, a failure ratio.
Every response carries `x-upstream: <name>` so tests can see which instance answered.

Paths with meaning: `/status/<code>` answers that status; `/echo` answers the request body;
`/delay/<seconds>` waits that long first. Everything else follows the scripted behaviour.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

__all__ = ["Behaviour", "UpstreamServer"]


@dataclass
class Behaviour:
    """What an UpstreamServer does with each request.

    `fail_every`: when > 0, every n-th request answers `fail_status` (deterministic, so a test
    knows the failure ratio exactly: 2 means half of all requests fail).
    `drop`: close the connection without answering.
    """

    status: int = 200
    delay: float = 0.0
    drop: bool = False
    fail_every: int = 0
    fail_status: int = 503
    body: bytes = b"ok"
    headers: list[tuple[str, str]] = field(default_factory=list)


# One parsed request: method, target, raw headers, body, keep-alive.
_Message = tuple[str, str, list[tuple[bytes, bytes]], bytes, bool]


class _Protocol(asyncio.Protocol):
    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport  # set by connection_made, the first call
        self.url = b""
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.queue: asyncio.Queue[_Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_server's are stream ones
        self.server._connections.add(self.transport)
        self.task = asyncio.get_running_loop().create_task(self._answer())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self.transport)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body, self.headers = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.put_nowait(
            (
                self.parser.get_method().decode(),
                self.url.decode(),
                self.headers,
                b"".join(self.body),
                self.parser.should_keep_alive(),
            )
        )

    async def _answer(self) -> None:
        while True:
            method, url, headers, body, keep_alive = await self.queue.get()
            server = self.server
            server.requests += 1
            if server.record:
                server.seen.append(
                    (method, url, {k.decode().lower(): v.decode() for k, v in headers})
                )
            b = server.behaviour
            status, delay, payload = b.status, b.delay, b.body
            if b.fail_every and server.requests % b.fail_every == 0:
                status = b.fail_status
            if url.startswith("/status/"):
                status = int(url.split("/")[2].split("?")[0])
            elif url.startswith("/delay/"):
                delay = float(url.split("/")[2].split("?")[0])
            elif url.startswith("/echo"):
                payload = body
            if delay:
                await asyncio.sleep(delay)
            if b.drop:
                self.transport.close()
                return
            if status in (204, 304) or status < 200:
                payload = b""  # these statuses have no body (RFC 9110, 6.4.1)
            extra = "".join(f"{k}: {v}\r\n" for k, v in b.headers)
            head = (
                f"HTTP/1.1 {status} X\r\ncontent-length: {len(payload)}\r\n"
                f"x-upstream: {server.name}\r\n{extra}"
                f"{'' if keep_alive else 'connection: close' + chr(13) + chr(10)}\r\n"
            ).encode()
            self.transport.write(head + (b"" if method == "HEAD" else payload))
            if not keep_alive:
                self.transport.close()
                return


class UpstreamServer:
    """A real HTTP/1.1 server on 127.0.0.1 in its own thread. `start()`, `stop()`, restartable
    on the same port."""

    def __init__(
        self,
        name: str = "u",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        record: bool = True,
        **behaviour: Any,
    ) -> None:
        """`record=False` keeps only the count of requests, not each one in `seen` (for
        long-running uses such as the demo)."""
        self.name = name
        self.host = host
        self.port = port
        self.behaviour = Behaviour(**behaviour)
        self.requests = 0
        self.record = record
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Transport] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def behave(self, **changes: Any) -> None:
        """Change the behaviour while the server runs (`server.behave(status=503)`)."""
        for key, value in changes.items():
            if not hasattr(self.behaviour, key):
                raise TypeError(f"unknown behaviour {key!r}")
            setattr(self.behaviour, key, value)

    def start(self) -> UpstreamServer:
        if self._thread is not None:
            raise RuntimeError(f"upstream {self.name} is already running")
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(512)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        loop = self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                self._server = await loop.create_server(lambda: _Protocol(self), sock=sock)
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"upstream-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        """Close the listener and every open connection (a crashed instance, as seen from
        clients: connection refused afterwards)."""
        if self._thread is None or self._loop is None:
            return
        loop, server = self._loop, self._server

        async def shutdown() -> None:
            if server is not None:
                server.close()
            for transport in list(self._connections):
                transport.abort()
            # abort() closes the socket in a callback scheduled for the next loop iteration;
            # let it run before the loop stops, or the client keeps a half-dead connection.
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # and the answer tasks that connection_lost cancelled
            if server is not None:
                await server.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join(5)
        self._thread = None
        self._loop = None

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
