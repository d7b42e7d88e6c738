"""Helpers for the sidecar tests: an in-process sidecar on free ports, a raw socket client,
and a raw upstream that misbehaves on purpose (cut responses)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from meshcore._sidecar._runtime import Sidecar
from meshcore.testing import static_service

__all__ = ["LOOPBACK", "raw_exchange", "running_sidecar", "wait_for", "static_service"]

LOOPBACK = {"outbound": "127.0.0.1:0", "inbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}


def sidecar_config(services: dict[str, Any], **sidecar: Any) -> dict[str, Any]:
    return {"services": services, "sidecar": {**LOOPBACK, **sidecar}}


@contextlib.asynccontextmanager
async def running_sidecar(config: dict[str, Any], **kwargs: Any) -> AsyncIterator[Sidecar]:
    async with Sidecar(config, [], **kwargs) as sidecar:
        yield sidecar


def url(sidecar: Sidecar, listener: str, path: str = "/") -> str:
    return f"http://{sidecar.addresses[listener]}{path}"


async def raw_exchange(
    sidecar: Sidecar, listener: str, data: bytes, *, timeout: float = 5.0
) -> bytes:
    """Send raw bytes, read until the sidecar closes the connection (bounded by `timeout`)."""
    address = sidecar.addresses[listener]
    stream = await anyio.connect_tcp(address.host, address.port)
    received = b""
    async with stream:
        await stream.send(data)
        with anyio.fail_after(timeout):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


async def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    """Poll a condition another task or thread makes true (connection cleanup), bounded."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


def open_connections(sidecar: Sidecar) -> dict[str, int]:
    return {name: len(conns) for name, conns in sidecar.connections.items()}


async def admin_json(sidecar: Sidecar, path: str = "/state") -> Any:
    async with httpx.AsyncClient() as client:
        return json.loads((await client.get(url(sidecar, "admin", path))).text)


class CutUpstream:
    """A raw upstream that sends a response head promising `length` bytes, 10 bytes, then closes."""

    def __init__(self, length: int = 1000) -> None:
        self.length = length
        self.port = 0
        self.address = ""

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.address = f"127.0.0.1:{self.port}"
        task_status.started()

        async def answer(stream: Any) -> None:
            async with stream:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                await stream.send(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n0123456789" % self.length
                )

        await listener.serve(answer)


@pytest.fixture(params=[1000, 100_000], ids=["small", "large"])
def cut_upstream(request: pytest.FixtureRequest) -> CutUpstream:
    return CutUpstream(request.param)
