"""Message bodies, both sides: one chunk iterator over what the parser has put aside.

A body being parsed lives on a `Source` (the client's connection, the server's request
cycle): `chunks` the parser appended and not yet handed out, `complete` once the message
ended. `ChunkIterator` hands the chunks out joined, and asks its subclass to read more when
there are none; `ResponseBody` (client) and `RequestBody` (server) only say how to read more
and what ending means.
"""

from __future__ import annotations

from typing import Protocol

# Chunk extensions and trailers are overhead a sender can inflate at will ("1;<16 MiB>\r\nX").
# Go's net/http allowance (src/net/http/internal/chunked.go, `excess`): 16 bytes per chunk plus
# twice the chunk's data, and at most 16 KiB beyond that, else "too much non-data".
MAX_CHUNK_EXCESS = 16384


def chunk_excess(excess: int, read: int, data: int, chunks: int) -> int:
    """The excess after a read of `read` bytes that held `data` body bytes and `chunks` chunk
    headers, on top of `excess` so far (never below zero)."""
    return max(0, excess + read - 3 * data - 16 * chunks)


def head_end(data: bytes, tail: bytes = b"") -> int:
    """Where in `data` (a read in which a head ended) that head ends: after its first CRLFCRLF
    (llhttp takes no bare LF). `tail`: the last bytes of the previous read when the head began
    there, as its CRLFCRLF may straddle the two. When another message ended earlier in the
    same read this finds its end instead, so its bytes count too: erring on the side of the
    limit."""
    i = (tail + data).find(b"\r\n\r\n") if tail else data.find(b"\r\n\r\n")
    return max(0, i + 4 - len(tail)) if i >= 0 else 0


class Source(Protocol):
    chunks: list[bytes]
    complete: bool


class ChunkIterator:
    """`async for chunk in body`: the parsed chunks of a message as they come."""

    __slots__ = ("source",)

    source: Source | None

    def __aiter__(self) -> ChunkIterator:
        return self

    async def __anext__(self) -> bytes:
        source = self.source
        if source is None:
            raise StopAsyncIteration
        while True:
            chunks = source.chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if source.complete:
                    await self.ended()  # e.g. the connection goes back before the last chunk
                return data
            if source.complete:
                await self.ended()
                raise StopAsyncIteration
            await self.read_more(source)

    async def read_more(self, source: Source) -> None:
        """Read from the connection until the parser has added chunks or completed."""
        raise NotImplementedError

    async def ended(self) -> None:
        """The message is complete and all of it handed out (or being handed out)."""
        self.source = None

    async def aclose(self) -> None:
        """Stop reading (the subclass says what becomes of the connection)."""
        self.source = None


class BufferedBody:
    """A response body that arrived whole with the head; its connection is already free.

    Iterates as one chunk like any streamed body; the server side of the engine reads `data`
    directly, so a proxied small response goes out in one send.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    def __aiter__(self) -> BufferedBody:
        return self

    async def __anext__(self) -> bytes:
        data = self.data
        self.data = None
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        self.data = None


class Exchange(Source, Protocol):
    """The client connection a streamed response body reads (`_http11.HTTP11Connection`)."""

    async def receive_body(self, timeout: float | None) -> None: ...

    async def finish(self) -> None: ...

    async def discard(self) -> None: ...


class ResponseBody(ChunkIterator):
    """A streamed response body; owns its connection until the end or `aclose()`, and gives it
    back before handing out the last chunk."""

    __slots__ = ("conn", "read_timeout")

    def __init__(self, conn: Exchange, read_timeout: float | None) -> None:
        self.source = self.conn = conn
        self.read_timeout = read_timeout

    async def read_more(self, source: Source) -> None:
        try:
            await self.conn.receive_body(self.read_timeout)
        except BaseException:
            self.source = None
            await self.conn.discard()
            raise

    async def ended(self) -> None:
        if self.source is not None:
            self.source = None
            await self.conn.finish()

    async def aclose(self) -> None:
        """A finished body returns the connection, an unfinished one closes it."""
        conn = self.source
        if conn is None:
            return
        if conn.complete:
            await self.ended()
            return
        self.source = None
        await self.conn.discard()


class Cycle(Source, Protocol):
    """The server's request cycle a request body reads (`_server.RequestResponseCycle`)."""

    async def receive_body(self) -> None: ...


class RequestBody(ChunkIterator):
    """`request.stream` on the server: reads the connection as the handler iterates; the
    connection drains or closes after the response, so closing early releases nothing."""

    __slots__ = ("cycle",)

    def __init__(self, cycle: Cycle) -> None:
        self.source = self.cycle = cycle

    async def read_more(self, source: Source) -> None:
        await self.cycle.receive_body()

    def take_whole(self, limit: int) -> bytes | None:
        """The whole body when all of it has arrived, none was handed out (it usually came
        with the head) and it is at most `limit` bytes, without a read; else None and the
        body streams as before."""
        source = self.source
        if source is None or not source.complete:
            return None
        chunks = source.chunks
        if len(chunks) == 1:  # the usual case: the body came in the read that held the head
            data = chunks[0]
            if len(data) > limit:
                return None
        elif sum(map(len, chunks)) > limit:
            return None
        else:
            data = b"".join(chunks)
        chunks.clear()
        self.source = None
        return data

    async def aclose(self) -> None:
        """Nothing to release: the connection drains or closes after the response."""
