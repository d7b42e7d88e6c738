"""meshcore.testing's helpers for tests that start servers as processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from meshcore.testing import free_port, wait_listening


def test_wait_listening_returns_once_something_accepts() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_listening(server.getsockname()[1], timeout=2.0)


def test_wait_listening_gives_up_after_its_timeout() -> None:
    port = free_port()
    with pytest.raises(RuntimeError, match=f"nothing listening on 127.0.0.1:{port} after 0.1 s"):
        wait_listening(port, timeout=0.1)


def test_wait_listening_stops_when_the_process_exited() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait(10)
    with pytest.raises(RuntimeError, match=r"exited \(3\)"):
        wait_listening(free_port(), timeout=30.0, process=process)
