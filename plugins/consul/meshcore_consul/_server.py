"""The embedded registry's HTTP front: a compatible subset of Consul's HTTP API.

Why an asyncio server on a thread of its own: a blocking query holds its request open for up
to `wait` (5 minutes by default), so the registry keeps many requests open at once, and any
local process can open connections and send nothing. With a thread per connection, 300
half-sent requests made 300 threads that never timed out (plugins/consul/bench/slow_clients.py
measures it); here a connection is a coroutine and a few KiB, every read has a deadline, and
connections per client address are capped as Consul caps them. The loop runs on the
registry's own thread, so the registry works the same under whichever backend (asyncio or
trio) or virtual clock the embedding process runs, and from sync code.

Why not the core's HTTP engine: plugins use only the public `meshcore` API, and the engine's
server is private (and being restructured). The registry's needs are small: HTTP/1.1 with
Content-Length bodies, keep-alive, and one answer per request.

The request path, in order (every error answers and then either drains the body, so the
keep-alive connection stays in step, or closes it):

1. the head is read within `read_timeout` (and an idle keep-alive connection is closed after
   `idle_timeout`); more than `MAX_HEAD` bytes: 431, closed;
2. framing: `Transfer-Encoding` is refused (411, closed); `Content-Length` must be digits
   (400, closed) and at most `max_body` (413, closed), all before any body byte is read;
3. the route: unknown path 404, wrong method 405 with `Allow` (body drained);
4. the ACL token (403; a body is not read for a caller without the token: closed);
5. a route that takes a body and got no `Content-Length`: 411;
6. the body is read within `read_timeout`, then the route answers.

Endpoints (shared/reference/discovery-apis.md has the exact API facts): see `_routes` below
and docs/registry.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ._catalog import MIN_DEREGISTER_AFTER, Catalog, RawJSON, RegistryError
from ._duration import parse_go_duration
from ._filter import Predicate, compile_filter
from ._token import TOKEN_FILE, load_or_create_token

__all__ = ["Registry"]

log = logging.getLogger("meshcore_consul.registry")

# Consul: `wait` defaults to 5 minutes and is capped at 10 (server MaxQueryTime); the server
# adds up to wait/16 of random jitter so watchers spread out (agent/consul/server.go).
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
# Consul's own API body limits: `limits.kv_max_value_size` and `limits.txn_max_req_len`
# both default to 512 KiB (agent configuration reference); a registration is far smaller.
MAX_BODY = 512 << 10
# Go's net/http (Consul's server) refuses heads over http.DefaultMaxHeaderBytes, 1 MiB; a
# registry client sends a few hundred bytes, so 64 KiB is ample and bounds memory sooner.
MAX_HEAD = 64 << 10
# Consul's `limits.http_max_conns_per_client` default (hashicorp/consul PR #7289).
MAX_CONNS_PER_CLIENT = 200
# A client sends a request head and body in one go; 10 s tolerates a loaded machine and ends
# a slowloris. Idle keep-alive connections get longer: clients pool them between queries.
READ_TIMEOUT = 10.0
IDLE_TIMEOUT = 90.0
VERSION = "1.17.0"  # the Consul API level this subset follows, reported by /v1/agent/self


class Registry:
    """A single-node, Consul-compatible registry, in-process.

    >>> with Registry(port=0, data_dir="reg") as reg:     # in a thread of its own
    ...     reg.url                                        # "http://127.0.0.1:54321"

    Also `async with Registry(...)` (starts in a thread, stops without blocking the loop).
    `port=0` picks a free port.

    Writes need the ACL token (`registry.token`): `token` when given, else the one kept in
    `<data_dir>/acl-token` (made 0600 at first start; `token_created` says this start made
    it), else a random one for this process's lifetime. `read_protected` requires it on
    reads too (Consul's `default_policy = "deny"`). `open_access=True` runs without any
    token and logs a warning at start.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        data_dir: Any = None,
        token: str | None = None,
        read_protected: bool = False,
        open_access: bool = False,
        datacenter: str = "dc1",
        node: str = "meshcore-registry",
        advertise: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_deregister_after: float = MIN_DEREGISTER_AFTER,
        max_conns_per_client: int = MAX_CONNS_PER_CLIENT,
        read_timeout: float = READ_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_body: int = MAX_BODY,
    ) -> None:
        self.host = host
        self.port = port
        self.read_protected = read_protected
        self.open_access = open_access
        # The write token: given, or the data directory's (made at first start), or one for
        # this process's lifetime when the registry keeps no files. None only when open.
        self.token: str | None = None
        self.token_file: Path | None = None
        self.token_created = False
        if open_access:
            if token or read_protected:
                raise ValueError("open_access runs without a token: do not also give a token or read_protected")
        elif token:
            self.token = token
        elif data_dir is not None:
            self.token_file = Path(data_dir) / TOKEN_FILE
            self.token, self.token_created = load_or_create_token(Path(data_dir))
        else:
            self.token = secrets.token_urlsafe(32)
        self.max_conns_per_client = max_conns_per_client
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        self.catalog = Catalog(
            node=node,
            node_address=advertise or (host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"),
            datacenter=datacenter,
            clock=clock,
            data_dir=data_dir,
            min_deregister_after=min_deregister_after,
        )
        self.connections = 0  # open client connections (all addresses)
        self.refused = 0  # connections refused over `max_conns_per_client`
        self._front: _Front | None = None
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
        if self._front is not None:
            raise RuntimeError("registry already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # Bound here, in the caller's thread, so a busy port raises OSError to the caller.
        # A backlog of 512: a burst of watchers (a mesh starting with many services) must
        # not overflow it and wait out a 1 s SYN retransmit.
        sock = socket.create_server((self.host, self.port), family=family, backlog=512, reuse_port=False)
        self.port = sock.getsockname()[1]
        if self.open_access:
            log.warning(
                "the registry at %s runs OPEN (no ACL token): any local process can deregister a "
                "service and register itself in its place", self.url)
        front = _Front(self, sock)
        self._front = front
        serve = threading.Thread(target=front.run, name=f"registry-http:{self.port}", daemon=True)
        expire = threading.Thread(target=self._expire_loop, name=f"registry-ttl:{self.port}", daemon=True)
        self._threads = [serve, expire]
        for t in self._threads:
            t.start()
        front.ready.wait(10)
        if front.failed is not None:
            self.stop()
            raise RuntimeError(f"the registry's HTTP front failed to start: {front.failed!r}")
        return self

    def stop(self) -> None:
        """Stop listening, end open connections (blocked queries included), join threads."""
        front, self._front = self._front, None
        if front is None:
            return
        self.catalog.close()
        front.stop()
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
                catalog.expiry.wait(delay)


# -- the HTTP front ------------------------------------------------------------------------


class _Close(Exception):
    """End the connection, answering `status` first when there is one."""

    def __init__(self, status: int | None = None, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    length: int | None  # Content-Length, None when absent
    conn: _Connection | None = None
    body: bytes = b""


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[_Request], Awaitable[_Reply]]


@dataclass(frozen=True)
class _Route:
    handler: Handler
    acl: str  # "write", "read" or "" (always open: status)
    body: bool = False  # takes a JSON body


class _Connection:
    """One client connection's reads: a buffer, so bytes read while watching for a hang-up
    during a blocking query are kept for the next request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def _fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise _Close()
        self.buf += data

    async def head(self, idle: float, timeout: float) -> bytes | None:
        """The next request head, None when the client is done (closed or idle too long)."""
        while self.buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore CRLFs before a request line
            del self.buf[:2]
        if not self.buf:
            try:
                async with asyncio.timeout(idle):
                    await self._fill()
            except (TimeoutError, _Close):
                return None
        try:
            async with asyncio.timeout(timeout):
                while (end := self.buf.find(b"\r\n\r\n")) < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise _Close(431, "Request Header Fields Too Large")
                    await self._fill()
        except TimeoutError:
            raise _Close(408, "Request Timeout: the request head was not sent in time") from None
        if end > MAX_HEAD:
            raise _Close(431, "Request Header Fields Too Large")
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        return head

    async def body(self, length: int, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                while len(self.buf) < length:
                    await self._fill()
        except TimeoutError:
            raise _Close(408, "Request Timeout: the request body was not sent in time") from None
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return body


class _Front:
    """The asyncio server of one Registry, run by `run()` on the registry's thread."""

    def __init__(self, registry: Registry, sock: socket.socket) -> None:
        self.registry = registry
        self.catalog = registry.catalog
        self.sock = sock
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.per_client: dict[str, int] = {}
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.socks: set[socket.socket] = set()
        self._stopped: asyncio.Event | None = None
        # Parked blocking queries wait on the Event of what they watch: one per service name
        # (made when the first query parks on it, dropped when set) and one for the whole
        # catalog. A change sets only the Events of the names whose index moved, so it wakes
        # only their watchers and the catalog-wide ones, not every parked query.
        self._changed: asyncio.Event | None = None
        self._named: dict[str, asyncio.Event] = {}
        self._route_table = self._routes()

    # -- loop --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as exc:  # pragma: no cover - a bug; never take the embedding process down
            self.failed = exc
            log.exception("registry HTTP front crashed")
        finally:
            self.sock.close()
            self.ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._changed = asyncio.Event()
        self.catalog.listen(self._on_change)
        self.sock.setblocking(False)
        accept = self.loop.create_task(self._accept())
        self.ready.set()
        try:
            await self._stopped.wait()
        finally:
            self.catalog.unlisten(self._on_change)
            accept.cancel()
            await asyncio.wait([accept])
            self.sock.close()
            for writer in list(self.writers):
                writer.transport.abort()
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.wait(list(self.tasks), timeout=2)
            # Whatever a transport has not closed yet (the loop ends now) is closed here.
            for conn in list(self.socks):
                conn.close()

    async def _accept(self) -> None:
        """Accept connections ourselves (not asyncio.start_server), so each socket is ours
        from the moment it exists and is closed at stop whatever state it is in."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and the like: keep serving who is connected
                log.warning("registry: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.socks.add(conn)
            task = loop.create_task(self._connection(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def stop(self) -> None:
        loop, stopped = self.loop, self._stopped
        if loop is not None and stopped is not None:
            try:
                loop.call_soon_threadsafe(stopped.set)
            except RuntimeError:  # the loop already ended
                pass
        else:
            self.sock.close()

    def _on_change(self, names: frozenset[str] | None) -> None:
        """Called by the catalog (any thread, its lock held) with the names whose index
        moved (None: closing): wake this loop's waiters on them and on the whole catalog."""
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._wake, names)
            except RuntimeError:  # the loop already ended
                pass

    def _wake(self, names: frozenset[str] | None) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        if changed is not None:
            changed.set()
        if names is None:
            named, self._named = self._named, {}
            for event in named.values():
                event.set()
            return
        for name in names:
            event = self._named.pop(name, None)
            if event is not None:
                event.set()

    def _event_for(self, name: str | None) -> asyncio.Event:
        """The Event a blocking query on `name` (None: the whole catalog) waits on."""
        if name is None:
            assert self._changed is not None
            return self._changed
        event = self._named.get(name)
        if event is None:
            event = self._named[name] = asyncio.Event()
        return event

    # -- one connection ----------------------------------------------------------------------

    async def _connection(self, sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_HEAD)
        except OSError:
            self.socks.discard(sock)
            sock.close()
            return
        self.writers.add(writer)
        try:
            await self._serve_connection(reader, writer)
        finally:
            self.writers.discard(writer)
            self.socks.discard(sock)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else ""
        registry = self.registry
        if self.per_client.get(client, 0) >= registry.max_conns_per_client:
            registry.refused += 1
            await _refuse(reader, writer, _Reply(
                429, b"Your IP is issuing too many concurrent connections, please rate limit your calls\n"))
            return
        self.per_client[client] = self.per_client.get(client, 0) + 1
        registry.connections += 1
        conn = _Connection(reader, writer)
        try:
            while await self._exchange(conn):
                pass
        except _Close as close:
            if close.status is not None:
                await _refuse(reader, writer, _Reply(close.status, close.message.encode()))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            registry.connections -= 1
            left = self.per_client[client] - 1
            if left:
                self.per_client[client] = left
            else:
                del self.per_client[client]
            writer.close()

    async def _exchange(self, conn: _Connection) -> bool:
        """Read one request and answer it. False: close the connection."""
        registry = self.registry
        raw = await conn.head(registry.idle_timeout, registry.read_timeout)
        if raw is None:
            return False
        method, target, keep_alive, headers = _parse_head(raw)
        length = _content_length(headers, registry.max_body)
        split = urlsplit(target)
        query: dict[str, list[str]] = {}
        for k, v in parse_qsl(split.query, keep_blank_values=True):
            query.setdefault(k, []).append(v)
        request = _Request(method, unquote(split.path), query, headers, length, conn)
        pending = length or 0  # body bytes still on the wire

        async def answer(reply: _Reply, keep: bool) -> bool:
            keep = keep and keep_alive
            conn.writer.write(_encode(reply, keep_alive=keep, head_only=method == "HEAD"))
            await conn.writer.drain()
            return keep

        try:
            route = self._route(request)
            self._authorize(request, route)
        except RegistryError as exc:
            reply = _Reply(exc.status, exc.message.encode(), exc.headers)
            if pending and exc.status == 403:
                raise _Close(403, exc.message) from None  # a caller without the token: its body is not read
            if pending:
                await conn.body(pending, registry.read_timeout)  # drain, stay in step
            return await answer(reply, True)
        if route.body and length is None:
            return await answer(_Reply(411, b"Length Required: send the body with a Content-Length"), True)
        request.body = await conn.body(pending, registry.read_timeout) if pending else b""
        try:
            reply = await route.handler(request)
        except RegistryError as exc:
            reply = _Reply(exc.status, exc.message.encode(), exc.headers)
        except _Gone:
            return False
        except Exception as exc:
            log.exception("internal error on %s %s", method, target)
            reply = _Reply(500, f"internal error: {type(exc).__name__}: {exc}".encode())
        return await answer(reply, True)

    # -- ACL ---------------------------------------------------------------------------------

    def _authorize(self, request: _Request, route: _Route) -> None:
        registry = self.registry
        expected = registry.token
        if expected is None or route.acl == "" or (route.acl == "read" and not registry.read_protected):
            return
        given = _token(request)
        what = "service:write" if route.acl == "write" else "service:read"
        if given is None:
            raise RegistryError(403, f"Permission denied: anonymous token lacks permission '{what}'")
        # Constant time: a byte-by-byte comparison would leak how much of a guess is right.
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise RegistryError(403, "ACL not found")

    # -- routes ------------------------------------------------------------------------------

    def _route(self, request: _Request) -> _Route:
        parts = request.path.split("/")  # "", "v1", ...
        if len(parts) < 3 or parts[1] != "v1":
            raise RegistryError(404, "404 page not found")
        key = "/".join(parts[2:5])
        rest = "/".join(parts[5:])
        key2 = "/".join(parts[2:4])
        rest2 = "/".join(parts[4:])
        routes = self._route_table
        if parts[2] in _OUT_OF_SCOPE or key2 in _OUT_OF_SCOPE:
            raise RegistryError(501, f"{request.path}: {_NOT_SERVED}")
        for k, r in ((key, rest), (key2, rest2)):
            entry = routes.get(k)
            if entry is not None:
                methods, route = entry
                if request.method not in methods:
                    raise RegistryError(405, f"method {request.method} not allowed",
                                        {"Allow": ", ".join(m for m in methods if m != "HEAD")})
                request.path = r  # what follows the route's prefix: a service or check id
                return route
        if key2 == "agent/service":  # GET /v1/agent/service/<id>: one service's definition
            raise RegistryError(501, f"{request.path}: {_NOT_SERVED}")
        raise RegistryError(404, "404 page not found")

    def _routes(self) -> dict[str, tuple[tuple[str, ...], _Route]]:
        """Path prefix (two or three segments after /v1/) -> allowed methods and route."""
        put, get = ("PUT",), ("GET", "HEAD")
        def w(handler: Handler, body: bool = False) -> _Route:
            return _Route(handler, "write", body)

        def r(handler: Handler) -> _Route:
            return _Route(handler, "read")

        c = self.catalog
        routes = {
            "agent/service/register": (put, w(self._register, body=True)),
            "agent/service/deregister": (put, w(self._deregister)),
            "agent/service/maintenance": (put, w(self._maintenance(service=True))),
            "agent/maintenance": (put, w(self._maintenance(service=False))),
            "agent/check/register": (put, w(self._check_register, body=True)),
            "agent/check/deregister": (put, w(self._check_deregister)),
            "agent/check/pass": (put, w(self._ttl("passing"))),
            "agent/check/warn": (put, w(self._ttl("warning"))),
            "agent/check/fail": (put, w(self._ttl("critical"))),
            "agent/check/update": (put, w(self._check_update, body=True)),
            "agent/services": (get, r(self._read(lambda q: c.agent_services(), blocking=False))),
            "agent/checks": (get, r(self._read(lambda q: c.agent_checks(), blocking=False))),
            "agent/members": (get, r(self._members)),
            "agent/self": (get, r(self._agent_self)),
            "health/service": (get, r(self._read(
                self._health_service, named="service"))),
            "health/checks": (get, r(self._read(lambda q: c.health_checks(q.path), named="service"))),
            "health/state": (get, r(self._read(
                lambda q: c.health_state(q.path) if "pretty" in q.query else c.health_state_json(q.path),
                named="state", watch_all=True, filtered=lambda q, p: _apply(c.health_state(q.path), p)))),
            "health/node": (get, r(self._read(lambda q: c.health_node(q.path), named="node", watch_all=True))),
            "catalog/service": (get, r(self._read(
                lambda q: c.catalog_service(q.path, tags=q.query.get("tag", [])), named="service"))),
            "catalog/services": (get, r(self._read(lambda q: c.catalog_services(), filtered=self._services_filtered))),
            "catalog/nodes": (get, r(self._read(lambda q: c.catalog_nodes()))),
            "catalog/node": (get, r(self._read(lambda q: c.catalog_node(q.path), named="node", watch_all=True,
                                               filtered=self._node_filtered))),
            "catalog/datacenters": (get, r(self._datacenters)),
            # Connect proxies and gateways cannot be registered here (400), so the instances
            # that serve a service through them are, truly, none.
            "catalog/connect": (get, r(self._read(lambda q: [], named="service"))),
            "health/connect": (get, r(self._read(lambda q: [], named="service"))),
            "health/ingress": (get, r(self._read(lambda q: [], named="service"))),
            "status/leader": (get, _Route(self._leader, "")),
            "status/peers": (get, _Route(self._peers, "")),
        }
        return routes

    def _json(self, request: _Request, value: Any, index: int | None = None) -> _Reply:
        registry = self.registry
        headers = {
            "X-Consul-Effective-Consistency": "leader",
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Default-ACL-Policy": "deny" if registry.read_protected else "allow",
        }
        if index is not None:
            headers["X-Consul-Index"] = str(max(index, 1))
        if isinstance(value, RawJSON):
            return _Reply(200, bytes(value), headers, "application/json")
        pretty = "pretty" in request.query
        text = json.dumps(value, indent=4 if pretty else None, separators=None if pretty else (",", ":"))
        return _Reply(200, text.encode(), headers, "application/json")

    def _health_service(self, request: _Request) -> Any:
        passing = _flag(request.query, "passing", "Invalid value for ?passing")
        tags = request.query.get("tag", [])
        if "pretty" in request.query or "filter" in request.query:
            return self.catalog.health_service(request.path, passing=passing, tags=tags)
        return self.catalog.health_service_json(request.path, passing=passing, tags=tags)

    @staticmethod
    def _decode(request: _Request) -> Any:
        if not request.body.strip():
            return None
        try:
            return json.loads(request.body)
        except (ValueError, RecursionError) as exc:
            raise RegistryError(400, f"Request decode failed: {exc}") from None

    async def _register(self, request: _Request) -> _Reply:
        self.catalog.register(self._decode(request), replace_existing_checks=_flag(
            request.query, "replace-existing-checks", "Invalid value for ?replace-existing-checks"))
        return _Reply(200)

    async def _deregister(self, request: _Request) -> _Reply:
        if not request.path:
            raise RegistryError(400, "Missing service ID")
        self.catalog.deregister(request.path)
        return _Reply(200)

    def _ttl(self, status: str) -> Handler:
        async def update(request: _Request) -> _Reply:
            self.catalog.update_check(request.path, status, request.query.get("note", [""])[-1])
            return _Reply(200)

        return update

    async def _check_update(self, request: _Request) -> _Reply:
        body = self._decode(request)
        data = {k.lower(): v for k, v in body.items()} if isinstance(body, dict) else {}
        status = data.get("status")
        output = data.get("output", "")
        if not isinstance(status, str) or not isinstance(output, str):
            raise RegistryError(
                400, 'Request decode failed: expected {"Status": "passing|warning|critical", "Output": "..."}')
        self.catalog.update_check(request.path, status, output)
        return _Reply(200)

    async def _agent_self(self, request: _Request) -> _Reply:
        if "filter" in request.query:
            raise RegistryError(400, "?filter is not supported on /v1/agent/self")
        return self._json(request, _self(self.registry))

    async def _leader(self, request: _Request) -> _Reply:
        return self._json(request, self.registry.address)

    async def _peers(self, request: _Request) -> _Reply:
        return self._json(request, [self.registry.address])

    def _read(
        self,
        produce: Callable[[_Request], Any],
        *,
        named: str = "",
        watch_all: bool = False,
        blocking: bool = True,
        filtered: Callable[[_Request, Predicate], Any] | None = None,
    ) -> Handler:
        """A catalog read: Consul's query checks, `?filter=` (applied to each item of a list or
        to each value of a map; never ignored), and blocking on the index of the service named
        in the path (`named="service"`) or of the whole catalog."""

        async def read(request: _Request) -> _Reply:
            catalog = self.catalog
            query = request.query
            if "stale" in query and "consistent" in query:
                raise RegistryError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
            dc = query.get("dc", [""])[-1]
            if dc and dc != catalog.datacenter:
                raise RegistryError(500, "No path to datacenter")
            if named and not request.path:
                raise RegistryError(400, f"Missing {named} name")
            predicate = compile_filter(query["filter"][-1]) if "filter" in query else None
            watched = request.path if named == "service" and not watch_all else None
            index, wait = _blocking_params(query)
            if index and blocking:
                await self._wait(request, watched, index, wait)
            with catalog.cond:
                current = catalog.index_for(watched)
                if named == "service" and query.get("peer", [""])[-1]:
                    value: Any = []  # no cluster peerings here: a peer's instances are none
                elif predicate is not None and filtered is not None:
                    value = filtered(request, predicate)
                else:
                    value = produce(request)
                    if predicate is not None:
                        value = _apply(value, predicate)
            return self._json(request, value, current if blocking else None)

        return read

    def _services_filtered(self, request: _Request, predicate: Predicate) -> dict[str, list[str]]:
        """`/v1/catalog/services?filter=`: Consul filters the instances (ServiceName,
        ServiceTags, ...) and lists the services and tags of those that match."""
        out: dict[str, list[str]] = {}
        for name in sorted({s.name for s in self.catalog.services.values()}):
            for entry in self.catalog.catalog_service(name):
                if predicate(entry):
                    tags = out.setdefault(name, [])
                    tags.extend(t for t in entry["ServiceTags"] if t not in tags)
        return out

    def _node_filtered(self, request: _Request, predicate: Predicate) -> Any:
        """`/v1/catalog/node/<node>?filter=` filters the node's `Services` map."""
        node = self.catalog.catalog_node(request.path)
        if node is not None:
            node["Services"] = {k: v for k, v in node["Services"].items() if predicate(v)}
        return node

    async def _check_register(self, request: _Request) -> _Reply:
        self.catalog.register_check(self._decode(request))
        return _Reply(200)

    async def _check_deregister(self, request: _Request) -> _Reply:
        if not request.path:
            raise RegistryError(400, "Missing check ID")
        self.catalog.deregister_check(request.path)
        return _Reply(200)

    def _maintenance(self, *, service: bool) -> Handler:
        async def maintenance(request: _Request) -> _Reply:
            raw = request.query.get("enable", [None])[-1]
            if raw is None or raw == "":
                raise RegistryError(400, "Missing value for enable")
            if raw not in ("true", "false"):
                raise RegistryError(400, f"Invalid value for enable: {raw!r}")
            if service and not request.path:
                raise RegistryError(400, "Missing service ID")
            self.catalog.maintenance(request.path if service else None, raw == "true",
                                     request.query.get("reason", [""])[-1])
            return _Reply(200)

        return maintenance

    async def _members(self, request: _Request) -> _Reply:
        if "filter" in request.query:
            raise RegistryError(400, "?filter is not supported on /v1/agent/members")
        member = dict(_self(self.registry)["Member"])
        if _flag(request.query, "wan", "Invalid value for ?wan"):
            member["Name"] = f"{member['Name']}.{self.catalog.datacenter}"
        return self._json(request, [member])

    async def _datacenters(self, request: _Request) -> _Reply:
        return self._json(request, [self.catalog.datacenter])

    async def _wait(self, request: _Request, name: str | None, index: int, wait: float) -> None:
        """Consul's blocking query: wait while the index of `name` is not past `index`.

        A coroutine per waiter, parked on the Event of `name`: cheap enough to park thousands,
        and a change wakes only the waiters of the names it touched. The connection
        is watched meanwhile, so a client that hangs up frees its slot at once instead of
        holding it for the rest of `wait`.
        """
        catalog = self.catalog
        assert self.loop is not None
        deadline = self.loop.time() + wait
        conn = request.conn
        hangup: asyncio.Future[bytes] | None = None
        if conn is not None:
            hangup = asyncio.ensure_future(conn.reader.read(65536))
        try:
            while True:
                # Taken before the test below: a change after the test sets this very Event.
                changed = self._event_for(name)
                with catalog.cond:
                    if catalog.closed or not catalog.waiting(name, index):
                        return
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    return
                waiter = asyncio.ensure_future(changed.wait())
                waits: set[asyncio.Future[Any]] = {waiter}
                if hangup is not None:
                    waits.add(hangup)
                done, _ = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if hangup is not None and hangup in done:
                    data = hangup.result()
                    if not data:
                        raise _Gone()
                    assert conn is not None
                    conn.buf += data  # a pipelined request: keep it for later
                    hangup = None
        finally:
            if hangup is not None:
                # The read must have ended before the connection reads again.
                hangup.cancel()
                await asyncio.wait({hangup})
                if not hangup.cancelled() and hangup.exception() is None and conn is not None:
                    conn.buf += hangup.result()


class _Gone(Exception):
    """The client hung up while its blocking query waited."""


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: _Reply) -> None:
    """Answer and close without reading the request. The request's bytes are read away
    (briefly) after our side is shut, or closing with them unread would reset the
    connection and the client would never see the answer."""
    try:
        writer.write(_encode(reply, keep_alive=False))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(1.0):
            while await reader.read(65536):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


def _parse_head(raw: bytes) -> tuple[str, str, bool, dict[str, str]]:
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise _Close(400, "Bad Request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1] or not parts[2].startswith("HTTP/1."):
        raise _Close(400, "Bad Request: malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise _Close(400, "Bad Request: malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key == "content-length" and headers[key] != value:
                raise _Close(400, "Bad Request: conflicting Content-Length headers")
            headers[key] = f"{headers[key]}, {value}" if key != "content-length" else value
        else:
            headers[key] = value
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return method, target, keep_alive, headers


def _content_length(headers: dict[str, str], limit: int) -> int | None:
    """The body's length from the head, before a byte of it is read. Framing errors close
    the connection: after them the next request's start is unknown."""
    if "transfer-encoding" in headers:
        raise _Close(411, "Length Required: chunked bodies are not accepted, send a Content-Length")
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise _Close(400, f"Bad Request: invalid Content-Length {raw[:40]!r}")
    length = int(raw)
    if length > limit:
        raise _Close(413, f"Request body too large: {length} bytes, the limit is {limit}")
    return length


def _encode(reply: _Reply, *, keep_alive: bool, head_only: bool = False) -> bytes:
    try:
        reason = HTTPStatus(reply.status).phrase
    except ValueError:
        reason = ""
    lines = [
        f"HTTP/1.1 {reply.status} {reason}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(reply.body)}",
        "Vary: Accept-Encoding",
    ]
    lines += [f"{k}: {v}" for k, v in reply.headers.items()]
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + reply.body


def _token(request: _Request) -> str | None:
    # Consul's precedence: ?token, then X-Consul-Token, then Authorization: Bearer.
    if request.query.get("token"):
        return request.query["token"][-1]
    if request.headers.get("x-consul-token"):
        return request.headers["x-consul-token"]
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


# Consul APIs the embedded registry does not serve: answered 501 with this, never a wrong success.
_OUT_OF_SCOPE = {
    "kv", "session", "acl", "connect", "txn", "event", "query", "snapshot", "operator", "config",
    "coordinate", "internal", "peering", "peerings", "namespace", "namespaces", "partition", "partitions",
    "discovery-chain", "exported-services", "imported-services", "lock",
    "catalog/register", "catalog/deregister", "catalog/gateway-services", "agent/token", "agent/leave", "agent/force-leave", "agent/reload",
    "agent/metrics", "agent/monitor", "agent/join", "agent/connect", "agent/host", "agent/version",
    "agent/health",
}
_NOT_SERVED = (
    "not served by the embedded meshcore registry, which serves the agent, catalog and health "
    "APIs for the services, checks and node of one node (docs/registry.md); use a Consul agent for it"
)


def _apply(value: Any, predicate: Predicate) -> Any:
    """A filter over an answer: each item of a list, each value of a map."""
    if isinstance(value, list):
        return [item for item in value if predicate(item)]
    if isinstance(value, dict):
        return {key: item for key, item in value.items() if predicate(item)}
    return value


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


def _blocking_params(query: dict[str, list[str]]) -> tuple[int, float]:
    """`?index` and `?wait` (with Consul's jitter); index 0 means "do not block"."""
    raw_index = query.get("index", [""])[-1]
    if not raw_index:
        return 0, 0.0
    try:
        index = int(raw_index)
        if index < 0:
            raise ValueError
    except ValueError:
        raise RegistryError(400, "Invalid index") from None
    wait = DEFAULT_WAIT
    if query.get("wait", [""])[-1]:
        try:
            wait = parse_go_duration(query["wait"][-1])
            if wait < 0:
                raise ValueError
        except ValueError:
            raise RegistryError(400, "Invalid wait time") from None
    wait = min(wait, MAX_WAIT)
    return index, wait + random.random() * wait / 16


def _self(registry: Registry) -> dict[str, Any]:
    c = registry.catalog
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
        "Stats": {"consul": {"server": "true", "leader": "true", "leader_addr": registry.address,
                             "bootstrap": "true", "known_datacenters": "1"}},
        "xDS": None,
    }
