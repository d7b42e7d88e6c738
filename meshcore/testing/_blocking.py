"""Catching code that blocks the event loop, for the conformance suites.

Two detectors, because neither alone is both sure and complete:

- **Audit events** (PEP 578) and a wrapped `time.sleep` (its audit event is Python 3.12+):
  `time.sleep`, a `connect` or `sendto` on a blocking socket, name lookups (`getaddrinfo`
  outside the async libraries, `gethostbyname`) and `urllib` requests, made on the event
  loop's own thread while a check is active. Deterministic: it does not depend on how
  long the call took, so it neither flakes on a loaded machine nor misses a fast local call.
  Worker threads (`anyio.to_thread`, asyncio's resolver executor) are not the loop's thread.
- **A heartbeat** task that sleeps 10 ms at a time and records the longest real gap between
  wake-ups: the backstop for blocking that raises no audit event (a blocking `recv`, a busy
  loop). Its limit is generous (1 s by default) because a loaded 2-core machine delays a
  wake-up by tens of milliseconds; under trio's MockClock real gaps are shorter than virtual.

Python cannot remove an audit hook, so one is installed once and returns at once when no check
is active; `time.sleep` is wrapped only while a check is active (a module that did
`from time import sleep` keeps the original, which the heartbeat still sees when it is long).
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
import sysconfig
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, SupportsIndex

import anyio

__all__ = ["LoopBlockingCheck"]

_active: list[LoopBlockingCheck] = []
_installed = False
_STDLIB = sysconfig.get_paths()["stdlib"]
# Frames of these packages call getaddrinfo on the loop's thread for numeric hosts only
# (trio tries AI_NUMERICHOST first); the real lookups go to a worker thread.
_ASYNC_LIBRARIES = ("trio.", "anyio.", "asyncio.")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _active or event == "time.sleep":  # time.sleep: the wrapper reports it
        return
    try:
        for check in _active:
            if check.thread == threading.get_ident() and not check.paused:
                what = _blocking(event, args)
                if what is not None:
                    check.calls.append(f"{what} at {_where()}")
    except Exception:  # noqa: BLE001, S110 - an audit hook must never break the audited call
        pass


_sleep = time.sleep


def _checked_sleep(seconds: float | SupportsIndex) -> None:
    if float(seconds) > 0:
        for check in _active:
            if check.thread == threading.get_ident() and not check.paused:
                check.calls.append(f"time.sleep({seconds!r}) at {_where()}")
    _sleep(seconds)


def _blocking(event: str, args: tuple[Any, ...]) -> str | None:
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[-1]
        if sock.gettimeout() == 0.0:
            return None
        return f"a blocking {event.removeprefix('socket.')} to {address!r}"
    if event in ("socket.gethostbyname", "socket.gethostbyaddr"):
        return f"{event}({args[0]!r})"
    if event == "socket.getaddrinfo":
        host = args[0]
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        with contextlib.suppress(ValueError, TypeError):
            ipaddress.ip_address(host)
            return None  # numeric: no lookup, nothing waits
        if _caller_module().startswith(_ASYNC_LIBRARIES):
            return None
        return f"socket.getaddrinfo({host!r}) (a blocking name lookup)"
    if event == "urllib.Request":
        return f"urllib.request.urlopen({args[0]!r})"
    return None


def _caller_module() -> str:
    """The module that called into `socket` (frames: this, `_blocking`, `_audit`, socket.py)."""
    frame = sys._getframe(3)
    while frame is not None and frame.f_code.co_filename.endswith("socket.py"):
        frame = frame.f_back
    return "" if frame is None else str(frame.f_globals.get("__name__", ""))


def _where() -> str:
    """The innermost frame outside the standard library and this module: the plugin's line."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_STDLIB) and path != __file__:
            return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True


class LoopBlockingCheck:
    """`async with LoopBlockingCheck() as check:` records blocking calls made on this event
    loop's thread and the longest stall of the loop; `check.problems()` says what was found."""

    #: A heartbeat gap longer than this (seconds) is reported as the loop being blocked.
    limit: float = 1.0
    interval = 0.01

    def __init__(self, limit: float | None = None) -> None:
        if limit is not None:
            self.limit = limit
        self.calls: list[str] = []
        self.longest = 0.0
        self.paused = False
        self.thread = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LoopBlockingCheck]:
        _install()
        self.thread = threading.get_ident()
        _active.append(self)
        time.sleep = _checked_sleep
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            _active.remove(self)
            if not _active:
                time.sleep = _sleep

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Not checked inside: the test's own setup (stopping a server with `Popen.wait`)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    async def _heartbeat(self) -> None:
        last = time.perf_counter()
        while True:
            await anyio.sleep(self.interval)
            now = time.perf_counter()
            if not self.paused:
                self.longest = max(self.longest, now - last - self.interval)
            last = now

    def problems(self) -> list[str]:
        found = [f"blocking call on the event loop: {call}" for call in dict.fromkeys(self.calls)]
        if self.longest > self.limit:
            found.append(f"the event loop was blocked for {self.longest:.2f} s at once")
        return found
