"""Which requests are in flight: what drain and a reload's retirement wait for.

A request is counted in flight (sidecar-wide, in its config generation, and `conn.busy`) from
the handler's first line until its response is over. Most responses are over when the handler
returns (the body came whole with the head): the handler then uncounts it itself (`release`),
with no callback made. Only a response the engine still has to stream, or an answer of the
sidecar's own, gets a `done` callback (`done_callback`), which the body calls when the engine
closes it, or the connection's cleanup when the engine never wrote it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from ._generation import Generation
    from ._listeners import Connection

__all__ = ["InFlight"]


class InFlight:
    """The sidecar-wide count; each generation keeps its own beside it."""

    __slots__ = ("count", "quiet")

    def __init__(self) -> None:
        self.count = 0
        self.quiet: anyio.Event | None = None  # set by drain: fires when the count reaches 0

    def release(self, gen: Generation) -> None:
        gen.in_flight -= 1
        if gen.in_flight == 0 and gen.retiring:
            gen.idle.set()
        self.count -= 1
        if self.count <= 0 and self.quiet is not None:
            self.quiet.set()

    def done_callback(self, conn: Connection, gen: Generation) -> Callable[[], None]:
        """A callback that uncounts the request once, however many paths call it."""
        finished = False

        def done() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            if conn.done is done:
                conn.busy = False
                conn.done = None
            self.release(gen)

        conn.done = done
        return done

    async def wait_quiet(self) -> None:
        """Until no request is in flight (at once, without a checkpoint, when none is)."""
        self.quiet = anyio.Event()
        if self.count <= 0:
            self.quiet.set()
            return
        await self.quiet.wait()
