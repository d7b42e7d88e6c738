"""Fixtures for the consul plugin's tests: a real embedded registry, an inline round-robin
balancer (the round-robin plugin is a separate distribution), a snapshot watcher plugin, and
a tiny raw HTTP server that answers whatever bytes a test scripts (for malformed answers)."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from meshcore_consul import Registry

import meshcore


class InlineRoundRobin:
    """Kind `test-rr`: the simplest balancer that honours ejection and `exclude`."""

    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("test-rr", "balancer", {})]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind, settings, upstream):
        if kind != "test-rr":
            return None
        counter = itertools.count()

        class Balancer:
            def pick(self, snapshot, request, exclude):
                eps = [e for e in snapshot.endpoints if e not in exclude and not upstream.is_ejected(e)]
                eps = eps or list(snapshot.endpoints)
                return eps[next(counter) % len(eps)]

        return Balancer()


class SnapshotWatcher:
    """Records every published snapshot; `until(service, predicate)` waits for a match."""

    def __init__(self) -> None:
        self.snapshots: dict[str, Any] = {}
        self.history: list[tuple[float, str, Any]] = []
        self._changed: anyio.Event | None = None

    @meshcore.hookimpl
    def meshcore_endpoints_changed(self, service, snapshot):
        self.snapshots[service] = snapshot
        self.history.append((anyio.current_time(), service, snapshot))
        if self._changed is not None:
            self._changed.set()

    async def until(self, service: str, predicate: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        with anyio.fail_after(timeout):
            while True:
                snap = self.snapshots.get(service)
                if snap is not None and predicate(snap):
                    return snap
                self._changed = anyio.Event()
                await self._changed.wait()


def ports(snapshot: Any) -> set[int]:
    return {ep.port for ep in snapshot.endpoints}


@pytest.fixture
def watcher() -> SnapshotWatcher:
    return SnapshotWatcher()


@pytest.fixture
def registry(tmp_path) -> Iterator[Registry]:
    with Registry(port=0, data_dir=tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def consul_mesh(mesh_factory, watcher):
    """`consul_mesh(registry_url, mesh_service="api", **consul_settings)` -> Mesh (not started)."""

    def make(url: str, mesh_service: str = "api", extra: dict | None = None, **settings: Any) -> Any:
        config = {
            "services": {
                mesh_service: {
                    "discovery": "consul",
                    "balancer": "test-rr",
                    "consul": {"address": url, **settings},
                }
            },
            **(extra or {}),
        }
        return mesh_factory(
            config, plugins=["consul"],
            extra_plugins=[("test-rr", InlineRoundRobin()), ("watcher", watcher)],
        )

    return make


def register(registry: Registry, name: str, port: int, *, id: str | None = None,
             ttl: str | None = None, status: str = "passing", **extra: Any) -> str:
    """Register straight into the registry's catalog (the HTTP path has its own tests)."""
    body: dict[str, Any] = {"Name": name, "ID": id or f"{name}-{port}", "Address": "127.0.0.1",
                            "Port": port, **extra}
    if ttl:
        body["Check"] = {"TTL": ttl, "Status": status}
    registry.catalog.register(body)
    return body["ID"]


class RawServer:
    """A loopback HTTP server answering each request with the next scripted raw response.

    Each script item is bytes (sent as-is, then the connection closes) or a callable
    `(request_head: bytes) -> bytes`. The last item repeats. `requests` keeps request heads.
    """

    def __init__(self, script: list[Any], ssl_context: Any = None) -> None:
        self.script = list(script)
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_side=True)
            self.url = f"https://127.0.0.1:{self.port}"
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # ssl.SSLError included: a client refusing our certificate
                if self._stop:
                    return
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            n = len(self.requests)
            self.requests.append(head)
            item = self.script[min(n, len(self.script) - 1)]
            data = item(head) if callable(item) else item
            try:
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def response(body: bytes | str, *, status: str = "200 OK", index: int | None = 1,
             headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    if isinstance(body, str):
        body = body.encode()
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", "Connection: close",
             f"Content-Length: {len(body) if length is None else length}"]
    if index is not None:
        lines.append(f"X-Consul-Index: {index}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture
def raw_server() -> Iterator[Callable[[list[Any]], RawServer]]:
    made: list[RawServer] = []

    def make(script: list[Any], ssl_context: Any = None) -> RawServer:
        server = RawServer(script, ssl_context)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()
