"""Helpers for tests that need real components.

pytest is imported only inside the helpers that need it, so `meshcore.testing`'s servers work
in a plain install (examples, the demo) without test dependencies.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from .._endpoints import Endpoint

__all__ = ["free_port", "require_binary", "static_service", "strict_integration", "virtual_trio"]


def virtual_trio(autojump_threshold: float = 0) -> Any:
    """A parameter for `anyio_backend`: trio with a fresh MockClock, so sleeps and timeouts
    pass in virtual time (instantly once every task is blocked)::

        @pytest.mark.parametrize("anyio_backend", [virtual_trio()])
        async def test_backoff(anyio_backend): ...
    """
    import pytest

    try:
        import trio.testing
    except ImportError:
        from ._plugin import TRIO_MISSING

        if strict_integration():
            pytest.fail(f"MESHCORE_REQUIRE_INTEGRATION=1: {TRIO_MISSING}", pytrace=False)
        return pytest.param("trio", id="trio-virtual", marks=pytest.mark.skip(reason=TRIO_MISSING))
    clock = trio.testing.MockClock(autojump_threshold=autojump_threshold)
    return pytest.param(("trio", {"clock": clock}), id="trio-virtual")

_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def strict_integration() -> bool:
    """True when CI asks that a missing real component fails instead of skipping."""
    return os.environ.get("MESHCORE_REQUIRE_INTEGRATION", "") not in ("", "0")


def require_binary(name: str) -> str:
    """The path of program `name`; skips the test when it is missing (fails under CI)."""
    path = shutil.which(name) or next(
        (p for d in _SBIN if os.access(p := os.path.join(d, name), os.X_OK)), None
    )
    if path is None:
        import pytest

        message = f"{name} is not installed (install the Debian package that provides it)"
        if strict_integration():
            pytest.fail(f"MESHCORE_REQUIRE_INTEGRATION=1: {message}")
        pytest.skip(message)
    return path


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    process: subprocess.Popen[Any] | None = None,
) -> None:
    """Block until something accepts TCP connections on `host:port` (a server started as a
    separate process); RuntimeError after `timeout` seconds, or as soon as `process` (a
    `subprocess.Popen`) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"the process meant to listen on {host}:{port} exited ({process.returncode})"
                ) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


def static_service(
    endpoints: Sequence[Any],
    *,
    balancer: str | None = None,
    resilience: Sequence[str] = (),
    **tables: Mapping[str, Any],
) -> dict[str, Any]:
    """A `[services.X]` table for static discovery over servers, endpoints or "host:port"."""
    entries: list[str | dict[str, Any]] = []
    for ep in endpoints:
        if isinstance(ep, Endpoint):
            entries.append({"address": f"{ep.address}:{ep.port}", "weight": ep.weight})
        elif hasattr(ep, "address") and isinstance(ep.address, str):
            entries.append(ep.address)
        else:
            entries.append(str(ep))
    table: dict[str, Any] = {"discovery": "static", "static": {"endpoints": entries}}
    if balancer is not None:
        table["balancer"] = balancer
    if resilience:
        table["resilience"] = list(resilience)
    for kind, settings in tables.items():
        table[kind.replace("_", "-")] = dict(settings)
    return table


@contextmanager
def raw_upstream(response: bytes) -> Iterator[int]:
    """A loopback server (its port yielded) that answers each connection's first request head
    with exactly `response` and closes it: for upstreams that misbehave in their bytes
    (oversized heads, bodies cut short). Threads, so it serves any backend's client."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                got = conn.recv(65536)
                if not got:
                    return
                data += got
            try:
                conn.sendall(response)
            except OSError:
                pass  # the client stopped reading: what a limit does

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
