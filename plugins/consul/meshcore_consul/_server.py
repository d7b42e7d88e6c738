"""The embedded registry's HTTP front: a compatible subset of Consul's HTTP API.

Why the standard library's ThreadingHTTPServer: a blocking query holds its request open for
up to `wait` (5 minutes by default), so the server must keep many waits open at once. A
thread per connection does that with a `threading.Condition` and no event loop, which makes
the registry independent of whichever backend (asyncio or trio) or virtual clock the process
embedding it runs, usable from sync code and tests alike, and free of new dependencies. A
development registry holds tens to a few hundred watchers; a thread each (~tens of KiB of
stack) is cheap at that size. Production points meshcore at a Consul cluster instead.

Endpoints (shared/reference/discovery-apis.md has the exact API facts):
PUT /v1/agent/service/register, /v1/agent/service/deregister/<id>,
/v1/agent/check/{pass,warn,fail}/<id>, /v1/agent/check/update/<id>;
GET /v1/health/service/<name>, /v1/catalog/services, /v1/catalog/service/<name> (blocking,
X-Consul-Index), /v1/agent/services, /v1/agent/checks, /v1/agent/self, /v1/status/leader,
/v1/status/peers.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ._catalog import MIN_DEREGISTER_AFTER, Catalog, RegistryError
from ._duration import parse_go_duration

__all__ = ["Registry"]

log = logging.getLogger("meshcore_consul.registry")

# Consul: `wait` defaults to 5 minutes and is capped at 10 (server MaxQueryTime); the server
# adds up to wait/16 of random jitter so watchers spread out (agent/consul/server.go).
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
MAX_REQUEST_BODY = 1 << 20
VERSION = "1.17.0"  # the Consul API level this subset follows, reported by /v1/agent/self


class Registry:
    """A single-node, Consul-compatible registry, in-process.

    >>> with Registry(port=0, data_dir="reg") as reg:     # in a thread of its own
    ...     reg.url                                        # "http://127.0.0.1:54321"

    Also `async with Registry(...)` (starts in a thread, stops without blocking the loop).
    `port=0` picks a free port. `token`, when set, is required on every write.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        data_dir: Any = None,
        token: str | None = None,
        datacenter: str = "dc1",
        node: str = "meshcore-registry",
        advertise: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_deregister_after: float = MIN_DEREGISTER_AFTER,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token or None
        self.catalog = Catalog(
            node=node,
            node_address=advertise or (host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"),
            datacenter=datacenter,
            clock=clock,
            data_dir=data_dir,
            min_deregister_after=min_deregister_after,
        )
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Registry:
        if self._server is not None:
            raise RuntimeError("registry already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server = _Server((self.host, self.port), _Handler, family=family, registry=self)
        self.port = server.server_address[1]
        self._server = server
        serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"registry-http:{self.port}", daemon=True)
        expire = threading.Thread(target=self._expire_loop, name=f"registry-ttl:{self.port}", daemon=True)
        self._threads = [serve, expire]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop listening, end open connections (blocked queries included), join threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self.catalog.close()
        server.shutdown()
        server.server_close()
        server.close_connections()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Registry:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.stop)

    def _expire_loop(self) -> None:
        catalog = self.catalog
        while not catalog.closed:
            upcoming = catalog.expire()
            with catalog.cond:
                if catalog.closed:
                    return  # type: ignore[unreachable]  # set by another thread since the loop's test
                delay = 1.0 if upcoming is None else min(max(upcoming - catalog.clock(), 0.002), 1.0)
                catalog.cond.wait(delay)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a burst of watchers (a mesh starting with
    # many services) would overflow it and wait out a 1 s SYN retransmit.
    request_queue_size = 512

    def __init__(self, address: Any, handler: Any, *, family: int, registry: Registry) -> None:
        self.address_family = family
        self.registry = registry
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self) -> None:
        with self.lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _flag(query: dict[str, list[str]], name: str, error: str) -> bool:
    """Consul's bool query parameters: bare `?passing` is true, else strconv.ParseBool."""
    if name not in query:
        return False
    value = query[name][-1]
    if value == "":
        return True
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise RegistryError(400, error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers: +40 ms on every answer (measured on Linux loopback).
    disable_nagle_algorithm = True
    server_version = "meshcore-registry"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Vary", "Accept-Encoding")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any, index: int | None = None, pretty: bool = False) -> None:
        headers = {
            "X-Consul-Effective-Consistency": "leader",
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Default-ACL-Policy": "deny" if self.server.registry.token else "allow",
        }
        if index is not None:
            headers["X-Consul-Index"] = str(max(index, 1))
        text = json.dumps(value, indent=4 if pretty else None, separators=None if pretty else (",", ":"))
        self._send(200, text.encode(), headers, "application/json")

    def _body(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise RegistryError(411, "Length Required")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RegistryError(400, "Invalid Content-Length") from None
        if length > MAX_REQUEST_BODY:
            self.close_connection = True
            raise RegistryError(413, "Request body too large")
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise RegistryError(400, f"Request decode failed: {exc}") from None

    def _token(self, query: dict[str, list[str]]) -> str | None:
        # Consul's precedence: ?token, then X-Consul-Token, then Authorization: Bearer.
        if query.get("token"):
            return query["token"][-1]
        if self.headers.get("X-Consul-Token"):
            return self.headers["X-Consul-Token"]
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    def _authorize_write(self, query: dict[str, list[str]], what: str) -> None:
        expected = self.server.registry.token
        if expected is None:
            return
        given = self._token(query)
        if given is None:
            raise RegistryError(403, f"Permission denied: anonymous token lacks permission '{what}'")
        if given != expected:
            raise RegistryError(403, "ACL not found")

    def _dispatch(self, method: str) -> None:
        try:
            split = urlsplit(self.path)
            path = unquote(split.path)
            query: dict[str, list[str]] = {}
            for k, v in parse_qsl(split.query, keep_blank_values=True):
                query.setdefault(k, []).append(v)
            self._route(method, path, query)
        except RegistryError as exc:
            if method == "PUT" and exc.status >= 400:
                # A body we did not read would be taken for the next request.
                self.close_connection = self.close_connection or exc.status in (411, 413)
            self._send(exc.status, exc.message.encode())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            log.exception("internal error on %s %s", method, self.path)
            self._send(500, f"internal error: {type(exc).__name__}: {exc}".encode())

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        catalog = self.server.registry.catalog
        parts = path.split("/")  # "", "v1", ...
        if len(parts) < 3 or parts[1] != "v1":
            raise RegistryError(404, "404 page not found")
        head = "/".join(parts[2:4])
        rest = "/".join(parts[4:])

        writes = {
            "agent/service": ("register", "deregister"),
            "agent/check": ("pass", "warn", "fail", "update"),
        }
        if head in writes and len(parts) >= 5 and parts[4] in writes[head]:
            action, rest = parts[4], "/".join(parts[5:])
            if method != "PUT":
                self.send_response(405)
                self.send_header("Allow", "PUT")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self._body()
            self._authorize_write(query, "service:write" if head == "agent/service" else "node:write")
            if action == "register":
                catalog.register(body, replace_existing_checks=_flag(
                    query, "replace-existing-checks", "Invalid value for ?replace-existing-checks"))
            elif action == "deregister":
                if not rest:
                    raise RegistryError(400, "Missing service ID")
                catalog.deregister(rest)
            elif action == "update":
                data = body if isinstance(body, dict) else {}
                data = {k.lower(): v for k, v in data.items()}
                status = data.get("status")
                output = data.get("output", "")
                if not isinstance(status, str) or not isinstance(output, str):
                    raise RegistryError(400, "Request decode failed: expected {\"Status\": \"passing|warning|critical\", \"Output\": \"...\"}")
                catalog.update_check(rest, status, output)
            else:
                status = {"pass": "passing", "warn": "warning", "fail": "critical"}[action]
                catalog.update_check(rest, status, query.get("note", [""])[-1])
            self._send(200, b"")
            return

        if method not in ("GET", "HEAD"):
            self.send_response(405)
            self.send_header("Allow", "GET")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        pretty = "pretty" in query
        if head == "status/leader":
            self._json(self.server.registry.address, pretty=pretty)
            return
        if head == "status/peers":
            self._json([self.server.registry.address], pretty=pretty)
            return
        if head == "agent/self":
            self._json(self._self(), pretty=pretty)
            return
        if head == "agent/services":
            self._json(catalog.agent_services(), pretty=pretty)
            return
        if head == "agent/checks":
            self._json(catalog.agent_checks(), pretty=pretty)
            return

        blocking = {"health/service", "catalog/service", "catalog/services"}
        if head not in blocking:
            raise RegistryError(404, "404 page not found")
        if "stale" in query and "consistent" in query:
            raise RegistryError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        dc = query.get("dc", [""])[-1]
        if dc and dc != catalog.datacenter:
            raise RegistryError(500, "No path to datacenter")
        name: str | None = None
        if head != "catalog/services":
            name = rest
            if not name:
                raise RegistryError(400, "Missing service name")
        passing = _flag(query, "passing", "Invalid value for ?passing")
        tags = query.get("tag", [])
        self._block(name, query)
        with catalog.cond:
            index = catalog.index_for(name)
            if head == "health/service":
                value: Any = catalog.health_service(name or "", passing=passing, tags=tags)
            elif head == "catalog/service":
                value = catalog.catalog_service(name or "", tags=tags)
            else:
                value = catalog.catalog_services()
        self._json(value, index, pretty)

    def _block(self, name: str | None, query: dict[str, list[str]]) -> None:
        """Consul's blocking query: wait while the index is not past `?index`."""
        raw_index = query.get("index", [""])[-1]
        if not raw_index:
            return
        try:
            index = int(raw_index)
            if index < 0:
                raise ValueError
        except ValueError:
            raise RegistryError(400, "Invalid index") from None
        if index == 0:
            return
        wait = DEFAULT_WAIT
        if query.get("wait", [""])[-1]:
            try:
                wait = parse_go_duration(query["wait"][-1])
                if wait < 0:
                    raise ValueError
            except ValueError:
                raise RegistryError(400, "Invalid wait time") from None
        wait = min(wait, MAX_WAIT)
        wait += random.random() * wait / 16
        self.server.registry.catalog.wait(name, index, wait)

    def _self(self) -> dict[str, Any]:
        reg = self.server.registry
        c = reg.catalog
        return {
            "Config": {
                "Datacenter": c.datacenter, "PrimaryDatacenter": c.datacenter,
                "NodeName": c.node, "NodeID": c.node_id, "Server": True,
                "Revision": "meshcore-registry", "Version": VERSION, "BuildDate": "",
            },
            "DebugConfig": {"EmbeddedRegistry": "meshcore"},
            "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
            "Member": {
                "Name": c.node, "Addr": c.node_address, "Port": 8301,
                "Tags": {"role": "consul", "dc": c.datacenter, "build": f"{VERSION}:meshcore"},
                "Status": 1, "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
                "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
            },
            "Meta": {"consul-network-segment": ""},
            "xDS": None,
        }
