"""How meshcore talks to a Consul agent: address, ACL token, TLS, bounded answers.

A thin client on `httpx.AsyncClient` (asyncio and trio alike) rather than py-consul, which is
sync/aiohttp-only (shared/reference/discovery-apis.md, section 4). Shared by discovery and
registration.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._token import client_token

__all__ = ["AgentAddress", "AgentConfig", "ConsulAnswerError", "parse_agent_address", "read_json"]

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

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.address.scheme != "https":
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.tls_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file or None)
        return ctx

    def client(self, max_connections: int = 16) -> httpx.AsyncClient:
        """An AsyncClient for this agent. Made inside the watcher/lifespan, never in a hook
        (loading CA and key files is I/O). A plain http agent gets no certificate store:
        loading the default CA bundle costs about 0.8 MiB and 18 ms per client."""
        headers = {"User-Agent": "meshcore-consul"}
        if self.token:
            headers["X-Consul-Token"] = self.token
        return httpx.AsyncClient(
            base_url=self.address.url,
            headers=headers,
            verify=self.ssl_context() if self.address.scheme == "https" else False,
            timeout=self.timeout,
            trust_env=False,
            transport=self.transport,
            # Blocking queries hold a connection each; a few spares for writes.
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )


async def read_json(response: httpx.Response, max_bytes: int) -> Any:
    """The JSON body of a streamed response, refusing more than `max_bytes`.

    Checked before and while reading, so a huge or endless body costs at most `max_bytes`.
    """
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ConsulAnswerError(f"answer of {int(length)} bytes exceeds the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    # aiter_bytes counts decoded bytes, so a gzip bomb is bounded too.
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise ConsulAnswerError(f"answer exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return json.loads(body)
    except RecursionError:
        raise ConsulAnswerError("answer is not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ConsulAnswerError(f"answer is not JSON: {exc}; body starts {body[:80]!r}") from None


def error_text(response: httpx.Response, body: bytes) -> str:
    """Consul's error bodies are plain text; keep a short, printable piece of it."""
    text = body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")
