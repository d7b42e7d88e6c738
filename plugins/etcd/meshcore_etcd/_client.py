"""How meshcore talks to an etcd v3 cluster: its JSON gRPC-gateway over httpx.

A small client rather than a library: none of the Python etcd clients runs on trio, and most
lose events on a leader loss or a compaction (shared/reference/etcd.md, section 5). The
gateway surface needed is a handful of POSTs (`/v3/kv/range`, `/v3/watch`, `/v3/lease/*`,
`/v3/maintenance/status`, `/v3/auth/authenticate`), on httpx so it runs on asyncio and trio.

Several members are configured; a request goes to the member in use and moves to the next one
on a transport error, a 5xx or "no leader", so one dead or partitioned member costs one
timeout, not an outage. Keys and values travel base64-encoded, int64 fields come back as
strings (lease IDs exceed 2^53, so they stay strings here).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from meshcore import describe_error as describe

__all__ = [
    "Cluster",
    "describe",
    "ClusterConfig",
    "EtcdAnswerError",
    "EtcdError",
    "EtcdUnreachable",
    "b64",
    "parse_endpoint",
    "prefix_end",
    "unb64",
]

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"

# gRPC status codes etcd answers with (google.golang.org/grpc/codes).
NOT_FOUND = 5
UNAUTHENTICATED = 16
UNAVAILABLE = 14


class EtcdAnswerError(Exception):
    """A member answered, but not with something usable (status, body, shape)."""


class EtcdError(EtcdAnswerError):
    """etcd refused a request: `code` is the gRPC code, `status` the HTTP status."""

    def __init__(self, member: str, status: int, code: int | None, message: str) -> None:
        super().__init__(f"{member}: HTTP {status}" + (f" (code {code})" if code is not None else "")
                         + (f": {message}" if message else ""))
        self.member = member
        self.status = status
        self.code = code
        self.message = message

    @property
    def lease_not_found(self) -> bool:
        return self.code == NOT_FOUND or "lease not found" in self.message

    @property
    def retry_elsewhere(self) -> bool:
        """A member-local failure another member may not have: no leader, 5xx, timeouts."""
        return self.status >= 500 or self.code == UNAVAILABLE or "no leader" in self.message


class EtcdUnreachable(Exception):
    """No member could be asked (connect, TLS, timeout); names each attempt and its cause."""


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def unb64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise EtcdAnswerError(f"{where}: expected a base64 string, got {value!r:.60}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise EtcdAnswerError(f"{where}: not base64: {value!r:.60}") from None


def prefix_end(prefix: bytes) -> bytes:
    """The `range_end` that makes a range or watch cover every key starting with `prefix`
    (etcd's `GetPrefixRangeEnd`: the prefix with its last byte below 0xff incremented)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # every key >= prefix


def parse_endpoint(value: str) -> str:
    """`http://host:port`, `https://host:port` or `host:port` (http) to a base URL."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'expected "http://host:port", "https://host:port" or "host:port", got {value!r}')
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"invalid port in {value!r}") from None
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"expected only scheme, host and port, got {value!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def parse_endpoints(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("expected at least one endpoint")
    return tuple(dict.fromkeys(parse_endpoint(v) for v in value))


def int64(value: Any, where: str, default: int | None = None) -> int:
    """An int64 field, sent as a JSON string (or a number by some encoders); omitted = 0."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EtcdAnswerError(f"{where}: expected an integer, got {value!r:.60}")
    try:
        return int(value)
    except ValueError:
        raise EtcdAnswerError(f"{where}: expected an integer, got {value!r:.60}") from None


@dataclass(frozen=True)
class ClusterConfig:
    """Where the cluster is and how to reach it, from a kind's or section's settings.

    Frozen and hashable: services whose settings give equal configs share one watch.
    """

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_skip_verify: bool = False
    timeout: float = 2.0
    max_answer_size: int = 32 << 20
    # An httpx transport to use instead of TCP (tests, embedders); not part of equality.
    transport: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", parse_endpoints(tuple(self.endpoints)))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ClusterConfig:
        # As etcdctl does (ETCDCTL_PASSWORD), a password may come from the environment so
        # it need not be written into mesh.toml.
        password = settings.get("password") or os.environ.get("ETCD_PASSWORD", "")
        return cls(
            endpoints=tuple(settings["endpoints"]),
            username=settings.get("username", ""),
            password=password,
            ca_file=settings.get("ca_file", ""),
            cert_file=settings.get("cert_file", ""),
            key_file=settings.get("key_file", ""),
            tls_skip_verify=settings.get("tls_skip_verify", False),
            timeout=settings.get("timeout", 2.0),
            max_answer_size=settings.get("max_answer_size", 32 << 20),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not any(e.startswith("https:") for e in self.endpoints):
            return True
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.tls_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file or None)
        return ctx


async def read_json(response: httpx.Response, max_bytes: int, where: str) -> Any:
    """The JSON body of a streamed response, refusing more than `max_bytes` (checked before
    and while reading, so a huge or endless body costs at most `max_bytes`)."""
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise EtcdAnswerError(f"{where}: answer of {int(length)} bytes exceeds the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise EtcdAnswerError(f"{where}: answer exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return parse_json(b"".join(chunks), where)


def parse_json(body: bytes, where: str) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise EtcdAnswerError(f"{where}: answer is not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise EtcdAnswerError(f"{where}: answer is not JSON: {exc}; body starts {body[:80]!r}") from None


def error_of(member: str, status: int, data: Any) -> EtcdError:
    """The error in a gateway answer: unary calls say `{"error": str, "code": n}`, a stream
    says `{"error": {"grpc_code": n, "http_code": n, "message": str}}`."""
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping):
            code = error.get("grpc_code")
            http = error.get("http_code")
            message = str(error.get("message", ""))[:200]
            return EtcdError(member, http if isinstance(http, int) else status,
                             code if isinstance(code, int) else None, message)
        code = data.get("code")
        message = str(data.get("message") or error or "")[:200]
        return EtcdError(member, status, code if isinstance(code, int) else None, message)
    return EtcdError(member, status, None, repr(data)[:200])


class Cluster:
    """One httpx client over the members of a cluster, with failover and auth tokens.

    `member` is the index of the member in use: requests start there and it moves on
    failures, so discovery and registration stay on a member that answers. Use as an async
    context manager (it owns the connections); made inside a task, never in a hook.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.members = config.endpoints
        self.member = 0
        self.failovers = 0
        # Simple tokens are member-local in etcd (only JWT tokens are valid cluster-wide), so
        # one token per member.
        self._tokens: dict[str, str] = {}
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Cluster:
        self._client = httpx.AsyncClient(
            headers={"User-Agent": "meshcore-etcd"},
            verify=self.config.ssl_context(),
            timeout=self.config.timeout,
            trust_env=False,
            transport=self.config.transport,
            # One watch stream plus unary calls (probe, range, lease): a few connections.
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("use the Cluster as `async with Cluster(config) as cluster:`")
        return self._client

    @property
    def current(self) -> str:
        return self.members[self.member]

    def next_member(self) -> str:
        self.member = (self.member + 1) % len(self.members)
        self.failovers += 1
        return self.current

    async def _headers(self, member: str, *, fresh: bool = False) -> dict[str, str]:
        if not self.config.username:
            return {}
        token = None if fresh else self._tokens.get(member)
        if token is None:
            data = await self._post(member, "/v3/auth/authenticate",
                                    {"name": self.config.username, "password": self.config.password}, {})
            token = data.get("token") if isinstance(data, Mapping) else None
            if not isinstance(token, str) or not token:
                raise EtcdAnswerError(f"{member}: /v3/auth/authenticate answered no token")
            self._tokens[member] = token
        return {"Authorization": token}

    async def _post(self, member: str, path: str, body: Mapping[str, Any], headers: Mapping[str, str],
                    timeout: float | None = None) -> Any:
        async with self.client.stream(
            "POST", member + path, json=body, headers=headers,
            timeout=self.config.timeout if timeout is None else timeout,
        ) as response:
            if response.status_code != 200:
                try:
                    data = await read_json(response, 64 << 10, f"{member}{path}")
                except EtcdAnswerError:
                    data = None
                raise error_of(member, response.status_code, data)
            return await read_json(response, self.config.max_answer_size, f"{member}{path}")

    async def call(self, member: str, path: str, body: Mapping[str, Any], *,
                   timeout: float | None = None) -> dict[str, Any]:
        """One POST to one member; the answer's JSON object. EtcdError when etcd refuses,
        EtcdAnswerError for a wrong shape, httpx errors for the transport."""
        headers = await self._headers(member)
        try:
            data = await self._post(member, path, body, headers, timeout)
        except EtcdError as exc:
            if exc.code != UNAUTHENTICATED or not self.config.username:
                raise
            # The token expired (simple tokens live 5 min by default) or the member restarted.
            data = await self._post(member, path, body, await self._headers(member, fresh=True), timeout)
        if not isinstance(data, dict):
            raise EtcdAnswerError(f"{member}{path}: expected a JSON object, got {type(data).__name__}")
        if "error" in data and "header" not in data:
            raise error_of(member, 200, data)
        return data

    async def request(self, path: str, body: Mapping[str, Any], *,
                      timeout: float | None = None) -> dict[str, Any]:
        """`call` on the member in use, then on each other member while the failure is the
        member's (unreachable, 5xx, no leader). Raises the last refusal, or EtcdUnreachable
        naming every attempt."""
        attempts: list[str] = []
        for _ in range(len(self.members)):
            member = self.current
            try:
                return await self.call(member, path, body, timeout=timeout)
            except (httpx.HTTPError, OSError) as exc:  # OSError: an ssl alert read mid-stream
                attempts.append(f"{member}: {describe(exc)}")
            except EtcdError as exc:
                if not exc.retry_elsewhere:
                    raise
                attempts.append(str(exc))
            self.next_member()
        raise EtcdUnreachable(f"{path}: no member answered ({'; '.join(attempts)})")

    @asynccontextmanager
    async def stream(self, member: str, path: str, body: Mapping[str, Any],
                     headers: Mapping[str, str]) -> AsyncIterator[httpx.Response]:
        """A streamed POST (a watch) to one member, with no read timeout: a watch is silent
        while nothing changes, and the member's liveness is probed beside it."""
        auth = await self._headers(member)
        timeout = httpx.Timeout(self.config.timeout, read=None)
        async with self.client.stream("POST", member + path, json=body, headers={**auth, **headers},
                                      timeout=timeout) as response:
            if response.status_code != 200:
                try:
                    data = await read_json(response, 64 << 10, f"{member}{path}")
                except EtcdAnswerError:
                    data = None
                error = error_of(member, response.status_code, data)
                if error.code == UNAUTHENTICATED:
                    self._tokens.pop(member, None)
                raise error
            yield response
