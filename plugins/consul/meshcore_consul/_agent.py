"""How meshcore talks to a Consul agent: address, ACL token, TLS, bounded answers.

A thin client on meshcore's own HTTP engine (asyncio and trio alike) rather than py-consul,
which is sync/aiohttp-only (shared/reference/discovery-apis.md, section 4), or httpx, which
cost 2-3 ms of CPU per read and 8 MiB of imports (a sidecar watching 1,000 services reads
each of them at start). Shared by discovery, registration and `meshcore check`.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import meshcore
from meshcore import describe_error as describe

from ._token import client_token

__all__ = [
    "AgentAddress", "AgentClient", "AgentConfig", "AgentResponse", "AgentUnreachable", "ConsulAnswerError",
    "decode_json", "error_text", "parse_agent_address",
]

DEFAULT_AGENT = "http://127.0.0.1:8500"


class ConsulAnswerError(Exception):
    """The agent answered, but not with something usable (status, body, shape)."""


@dataclass(frozen=True)
class AgentAddress:
    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_agent_address(value: str) -> AgentAddress:
    """`http://host:port`, `https://host:port` or `host:port` (http); ValueError otherwise."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'expected "http://host:port", "https://host:port" or "host:port", got {value!r}')
    try:
        port = parts.port or (443 if parts.scheme == "https" else 8500)
    except ValueError:
        raise ValueError(f"invalid port in {value!r}") from None
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"expected only scheme, host and port, got {value!r}")
    return AgentAddress(parts.scheme, parts.hostname, port)


@dataclass(frozen=True)
class AgentConfig:
    """Connection settings for one agent, from a kind's or section's validated settings."""

    address: AgentAddress
    token: str = ""
    datacenter: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_skip_verify: bool = False
    timeout: float = 10.0
    # An httpx transport to use instead of TCP (tests in virtual time, embedders).
    transport: Any = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], address_key: str = "address") -> AgentConfig:
        # Like Consul's own CLI and SDKs, an empty token falls back to CONSUL_HTTP_TOKEN (then
        # MESHCORE_REGISTRY_TOKEN, then the embedded registry's token file), so secrets need
        # not be written into mesh.toml. TokenFileError names the file and the fix.
        token = client_token(settings.get("token", ""), settings.get("token_file", ""))
        return cls(
            address=settings[address_key],
            token=token,
            datacenter=settings.get("datacenter", ""),
            ca_file=settings.get("ca_file", ""),
            cert_file=settings.get("cert_file", ""),
            key_file=settings.get("key_file", ""),
            tls_skip_verify=settings.get("tls_skip_verify", False),
            timeout=settings.get("timeout", 10.0),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.address.scheme != "https":
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.tls_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file or None)
        return ctx

    def client(self, max_connections: int = 16) -> AgentClient:
        """A client for this agent. Made inside the watcher/lifespan, never in a hook
        (loading CA and key files is I/O). A plain http agent gets no certificate store:
        loading the default CA bundle costs about 0.8 MiB and 18 ms per client."""
        return AgentClient(self, max_connections)


class AgentUnreachable(Exception):
    """The agent could not be asked: connect, TLS, timeout, a cut answer. The message starts
    with the underlying error's type (`EndpointConnectError: ...`)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(describe(exc))


@dataclass(frozen=True)
class AgentResponse:
    """An agent's answer, read in full (within the caller's limit). `headers` keys are lower case."""

    status_code: int
    headers: dict[str, str]
    content: bytes


# What an answer that is not 200 may bring: Consul's errors are one line of plain text.
_ERROR_BODY = 4096


class AgentClient:
    """The connections to one agent, on meshcore's own HTTP/1.1 engine (`meshcore.HTTPConnector`):
    ~0.15 ms of CPU per read where httpx took ~0.8 ms, and no httpx import on the discovery
    path (8 MiB).
    With `AgentConfig.transport` set (an httpx transport: tests in virtual time, embedders)
    it sends through httpx instead."""

    def __init__(self, agent: AgentConfig, max_connections: int = 16) -> None:
        self.agent = agent
        host = agent.address.host
        self._endpoint = meshcore.Endpoint(host, agent.address.port)
        self._headers: list[tuple[bytes, bytes]] = [(b"User-Agent", b"meshcore-consul"), (b"Accept", b"*/*")]
        if agent.token:
            self._headers.append((b"X-Consul-Token", agent.token.encode("latin-1")))
        self._httpx: Any = None
        self._connector: meshcore.HTTPConnector | None = None
        if agent.transport is not None:
            import httpx  # only for an injected transport

            self._httpx = httpx.AsyncClient(
                base_url=agent.address.url, headers=[(k.decode(), v.decode()) for k, v in self._headers],
                timeout=agent.timeout, trust_env=False, transport=agent.transport)
        else:
            context = agent.ssl_context()
            self._connector = meshcore.HTTPConnector(
                limits=meshcore.PoolLimits(max_connections=max_connections, max_idle=max_connections),
                ssl_context=context, server_hostname=host if context else None)

    async def request(
        self, method: str, path: str, *, params: Sequence[tuple[str, str]] = (), body: Any = None,
        read_timeout: float | None = None, max_bytes: int = 32 << 20,
    ) -> AgentResponse:
        """Send and read the answer, refusing a body over `max_bytes` (checked before and while
        reading, so a huge or endless body costs at most that); `body` is sent as JSON. A
        status other than 200 reads at most 4 KiB of its body. Raises AgentUnreachable when
        the agent could not be asked, ConsulAnswerError when the body is too large."""
        target = path + ("?" + urlencode(params) if params else "")
        timeout = self.agent.timeout
        read = timeout if read_timeout is None else read_timeout
        content = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        try:
            if self._httpx is not None:
                return await self._send_httpx(method, target, content, timeout, read, max_bytes)
            assert self._connector is not None
            headers = meshcore.Headers(self._headers)
            if body is not None:
                headers.append((b"Content-Type", b"application/json"))
            address = self.agent.address
            request = meshcore.Request(
                method, meshcore.URL(address.scheme, address.host, address.port, target), headers, content,
                {"timeout": {"connect": timeout, "read": read, "write": timeout, "pool": timeout}})
            response = await self._connector.send(self._endpoint, request)
            try:
                status = response.status_code
                names = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                limit = max_bytes if status == 200 else _ERROR_BODY
                data = await _bounded(response.aiter_bytes(), names.get("content-length"), limit, status == 200)
            finally:
                await response.aclose()
            return AgentResponse(status, names, data)
        except ConsulAnswerError:
            raise
        except (meshcore.EndpointError, OSError) as exc:
            raise AgentUnreachable(exc) from exc
        except Exception as exc:
            if self._httpx is not None and isinstance(exc, _httpx_error()):
                raise AgentUnreachable(exc) from exc
            raise

    async def _send_httpx(
        self, method: str, target: str, content: bytes, timeout: float, read: float, max_bytes: int,
    ) -> AgentResponse:
        import httpx

        headers = {"Content-Type": "application/json"} if content else None
        async with self._httpx.stream(method, target, content=content or None, headers=headers,
                                      timeout=httpx.Timeout(timeout, read=read)) as response:
            status = response.status_code
            names = {k.lower(): v for k, v in response.headers.items()}
            limit = max_bytes if status == 200 else _ERROR_BODY
            data = await _bounded(response.aiter_bytes(), names.get("content-length"), limit, status == 200)
        return AgentResponse(status, names, data)

    def get(self, path: str, *, params: Sequence[tuple[str, str]] = (), read_timeout: float | None = None,
            max_bytes: int = 32 << 20) -> Awaitable[AgentResponse]:
        return self.request("GET", path, params=params, read_timeout=read_timeout, max_bytes=max_bytes)

    def put(self, path: str, *, params: Sequence[tuple[str, str]] = (), body: Any = None) -> Awaitable[AgentResponse]:
        return self.request("PUT", path, params=params, body=body)

    async def aclose(self) -> None:
        if self._connector is not None:
            await self._connector.aclose()
        if self._httpx is not None:
            await self._httpx.aclose()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _httpx_error() -> type[BaseException]:
    import httpx

    return httpx.HTTPError


async def _bounded(chunks: AsyncIterator[bytes], length: str | None, max_bytes: int, strict: bool) -> bytes:
    """At most `max_bytes` of a body: more raises ConsulAnswerError when `strict`, else is cut."""
    if strict and length is not None and length.isdigit() and int(length) > max_bytes:
        raise ConsulAnswerError(f"answer of {int(length)} bytes exceeds the limit of {max_bytes} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            if strict:
                raise ConsulAnswerError(f"answer exceeds the limit of {max_bytes} bytes")
            parts.append(chunk[: max_bytes - size + len(chunk)])
            break
        parts.append(chunk)
    return b"".join(parts)


def decode_json(body: bytes) -> Any:
    """An answer's JSON; ConsulAnswerError when it is not JSON."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ConsulAnswerError("answer is not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ConsulAnswerError(f"answer is not JSON: {exc}; body starts {body[:80]!r}") from None


def error_text(response: AgentResponse) -> str:
    """Consul's error bodies are plain text; keep a short, printable piece of it."""
    text = response.content[:200].decode("utf-8", "replace").strip()
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")
