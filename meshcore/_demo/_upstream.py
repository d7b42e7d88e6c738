"""The demo's upstream service: a tiny HTTP/1.1 server whose behaviour the timeline changes.

Each instance runs its own asyncio loop in a thread (so it answers whatever the demo's own
backend is doing) and parses with httptools, like meshcore's engine. `behave(status=..., delay=...)`
changes what it answers while it runs. Every answer names the instance (`x-upstream`).

(meshcore.testing has a richer server for tests, but it needs pytest installed; the demo must
run from a plain `pip install`.)
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import httptools

__all__ = ["DemoUpstream"]


class _Protocol(asyncio.Protocol):
    def __init__(self, server: DemoUpstream) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.queue: asyncio.Queue[tuple[bool, bool]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server._connections.add(transport)
        self.task = asyncio.get_running_loop().create_task(self._answer())

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server._connections.discard(self.transport)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def on_message_complete(self) -> None:
        self.queue.put_nowait((self.parser.get_method() == b"HEAD", self.parser.should_keep_alive()))

    async def _answer(self) -> None:
        while True:
            head_only, keep_alive = await self.queue.get()
            server = self.server
            server.requests += 1
            status, delay = server.status, server.delay
            if delay:
                await asyncio.sleep(delay)
            body = b"ok\n" if status < 400 else b"failing on purpose (meshcore demo)\n"
            self.transport.write(
                b"HTTP/1.1 %d X\r\ncontent-length: %d\r\ncontent-type: text/plain\r\n"
                b"x-upstream: %s\r\n%s\r\n%s" % (
                    status, len(body), server.name.encode(),
                    b"" if keep_alive else b"connection: close\r\n",
                    b"" if head_only else body,
                )
            )
            if not keep_alive:
                self.transport.close()
                return


class DemoUpstream:
    """One instance on 127.0.0.1 (a free port), in a thread of its own. `start()`, `stop()`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.status = 200
        self.delay = 0.0
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._connections: set[Any] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def behave(self, *, status: int | None = None, delay: float | None = None) -> None:
        if status is not None:
            self.status = status
        if delay is not None:
            self.delay = delay

    def start(self) -> DemoUpstream:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        loop = self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _Protocol(self), sock=sock)
                )
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failed.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"demo-upstream-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            self._thread.join(5)
            self._thread = None
            raise failed[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop, join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for transport in list(self._connections):
                transport.abort()
            await asyncio.sleep(0)  # let the aborted connections run connection_lost
            await self._server.wait_closed()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(10)
        self._thread = None
        self._loop = None
