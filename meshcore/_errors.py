"""The exception hierarchy.

Errors say what went wrong in mesh terms; following trio's `open_tcp_stream`, an error that
summarizes several attempts keeps every one of them.

In library mode they reach the application as httpx exceptions, so `except httpx.HTTPError`
keeps working: each class names the httpx class it becomes (`HTTPX_BASE`), and the transport,
the one place httpx objects exist, raises them as a subclass of both
(`meshcore._transport.as_httpx_error`). These classes themselves do not derive from httpx, so
the core, the engine and the sidecar never import it (about 100 ms of a process's start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ._endpoints import Endpoint

__all__ = [
    "Attempt",
    "CircuitOpen",
    "ConfigError",
    "DeadlineExceeded",
    "EndpointConnectError",
    "EndpointError",
    "EndpointProtocolError",
    "EndpointReadError",
    "EndpointTimeout",
    "HTTPStatusError",
    "IdentityRejected",
    "LocalRefusal",
    "MeshError",
    "MeshNotRunning",
    "NoEndpoints",
    "PluginError",
    "RetriesExhausted",
    "UnknownService",
]


class MeshError(Exception):
    """Base of every error the mesh raises on the request path.

    `service` names the mesh service the request was for (None for pass-through hosts). In
    library mode it is raised as an `httpx.TransportError` (a subclass of both), or of the
    httpx class `HTTPX_BASE` names on a subclass.
    """

    HTTPX_BASE: ClassVar[str] = "TransportError"

    def __init__(self, message: str, *, service: str | None = None) -> None:
        super().__init__(message)
        self.service = service


class MeshNotRunning(MeshError):
    """A request reached a mesh that has not started yet or has already closed."""


class NoEndpoints(MeshError):
    """The service has no endpoint to send to (none discovered, or discovery never answered)."""


class DeadlineExceeded(MeshError):
    """The request's overall deadline passed (it includes every retry and backoff); an
    `httpx.TimeoutException` in library mode.

    `attempts` lists the attempts made before it passed (endpoint, cause, time), as
    `RetriesExhausted` does; empty when the first attempt was still running.
    """

    def __init__(
        self, message: str, *, service: str | None = None, attempts: Sequence[Attempt] = ()
    ) -> None:
        super().__init__(message, service=service)
        self.attempts = list(attempts)

    HTTPX_BASE = "TimeoutException"


class CircuitOpen(MeshError):
    """The service's circuit breaker is open; calls fail at once until it probes again.

    `retry_at` is the anyio clock time at which the breaker lets probes through.
    """

    def __init__(self, message: str, *, service: str | None = None, retry_at: float) -> None:
        super().__init__(message, service=service)
        self.retry_at = retry_at


class LocalRefusal(MeshError):
    """A layer refused the request itself, before any endpoint saw it: a concurrency or rate
    limit, load shedding. Raise it from a Layer to say "not now, try again later".

    The sidecar answers it with 503 and `x-meshcore-error: local_refusal`, plus `Retry-After`
    when `retry_after` (seconds) is given; library mode raises it to the caller. Retry layers
    do not retry it: the refusal is local, so another endpoint would meet the same limit.
    """

    def __init__(
        self, message: str, *, service: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, service=service)
        self.retry_after = retry_after


class EndpointError(MeshError):
    """Sending to one endpoint failed.

    `replayable` is True only when the request provably never reached the server (a connect
    failure, or a reused keep-alive connection that closed before any response byte), so even
    a non-idempotent request may be sent again.

    `kind` names the failure for policies (retry's `retry_on`, breaker's `failure_errors`):
    one of `KINDS`, or None for a failure none of them describes.
    """

    KINDS = ("connect-failure", "reset", "timeout", "protocol-error")
    kind: str | None = None

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        endpoint: Endpoint | None = None,
        replayable: bool = False,
    ) -> None:
        super().__init__(message, service=service)
        self.endpoint = endpoint
        self.replayable = replayable


class EndpointConnectError(EndpointError):
    """The connection to the endpoint could not be made (always replayable); an
    `httpx.ConnectError` in library mode."""

    HTTPX_BASE = "ConnectError"
    kind = "connect-failure"

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        endpoint: Endpoint | None = None,
        replayable: bool = True,
    ) -> None:
        super().__init__(message, service=service, endpoint=endpoint, replayable=replayable)


class IdentityRejected(EndpointError):
    """The server presented a certificate from the mesh root with an identity that is not the
    one expected for the service; an `httpx.ConnectError` in library mode.

    It is a failure of that endpoint like a certificate from another CA: always replayable
    (the request was never sent), of kind `connect-failure`, so `retry` sends it to another
    endpoint and `breaker` ejects the impostor. Envoy checks the SAN inside the handshake, so
    a mismatch is a connect failure there too.
    """

    HTTPX_BASE = "ConnectError"
    kind = "connect-failure"

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        expected: str = "",
        actual: str = "",
        endpoint: Endpoint | None = None,
        replayable: bool = True,
    ) -> None:
        super().__init__(message, service=service, endpoint=endpoint, replayable=replayable)
        self.expected = expected
        self.actual = actual


class HTTPStatusError(MeshError):
    """`ClientResponse.raise_for_status()` found a status other than 2xx (the native client,
    `mesh.http()`); `response` is that response. An `httpx.HTTPStatusError` when httpx is
    loaded, as `raise_for_status` on an httpx response raises."""

    HTTPX_BASE = "HTTPStatusError"

    def __init__(self, message: str, *, response: Any, service: str | None = None) -> None:
        super().__init__(message, service=service)
        self.response = response


class UnknownService(MeshError):
    """A single-label host that is not a mesh service and does not resolve either: most likely
    a typo of a service name. `suggestions` are the close service names, `services` all of them.
    An `httpx.ConnectError` in library mode (the only mode that raises it).
    """

    HTTPX_BASE = "ConnectError"

    def __init__(
        self, message: str, *, host: str, suggestions: list[str], services: list[str]
    ) -> None:
        super().__init__(message)
        self.host = host
        self.suggestions = suggestions
        self.services = services


def unknown_service(host: str, exc: BaseException, services: Sequence[str]) -> UnknownService | None:
    """The error for `host` whose connection failed with `exc`, when that was the name lookup of
    a single-label host (a likely typo of a service); None otherwise."""
    if "." in host or ":" in host or not _did_not_resolve(exc):
        return None
    import difflib

    names = list(services)
    suggestions = difflib.get_close_matches(host, names, n=3)
    return UnknownService(
        f"host {host!r} is not a mesh service and does not resolve ({exc})."
        f"{did_you_mean(host, names)} Mesh services: {listing(names)}.",
        host=host, suggestions=suggestions, services=names,
    )


def not_a_service(host: str, services: Sequence[str]) -> MeshError:
    """The error for a host outside the mesh when pass-through is off."""
    return MeshError(
        f"host {host!r} is not a mesh service and pass-through is off "
        f"(services: {listing(list(services))}).{did_you_mean(host, services)}"
    )


def did_you_mean(host: str, services: Sequence[str]) -> str:
    import difflib  # imported here: the sidecar never needs it at start

    close = difflib.get_close_matches(host, list(services), n=3)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def listing(services: list[str], most: int = 20) -> str:
    if len(services) <= most:
        return ", ".join(services) or "none"
    return f"{', '.join(services[:most])}, ... ({len(services)} in all)"


def describe_error(exc: BaseException) -> str:
    """`Type: message`; for an error without a message, the first cause or context that has
    one (a timeout's message is often empty, the socket error under it is not). For plugins'
    status and log lines (a registry's `last_error`, say)."""
    detail = str(exc)
    cause: BaseException | None = exc
    while not detail and cause is not None:
        cause = cause.__cause__ or cause.__context__
        if cause is not None and str(cause):
            detail = f"{type(cause).__name__}: {cause}"
    return type(exc).__name__ + (f": {detail}" if detail else "")


def _did_not_resolve(exc: BaseException) -> bool:
    """Whether a connect failure was the name lookup (the resolver's gaierror is kept in the
    cause chain by httpx and by meshcore's engine, on asyncio and trio alike)."""
    import socket

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class EndpointReadError(EndpointError):
    """The connection broke (reset, closed) while the request was in flight; an
    `httpx.ReadError` in library mode."""

    HTTPX_BASE = "ReadError"
    kind = "reset"


class EndpointTimeout(EndpointError):
    """Connecting to, writing to or reading from the endpoint took too long; an
    `httpx.TimeoutException` in library mode."""

    HTTPX_BASE = "TimeoutException"

    @property
    def kind(self) -> str:  # type: ignore[override]  # a class attribute on the other errors
        # A timeout before anything was sent never reached the server: Envoy counts a connect
        # timeout as a connect failure.
        return "connect-failure" if self.replayable else "timeout"


class EndpointProtocolError(EndpointError):
    """The endpoint answered something that is not valid HTTP/1.1; an
    `httpx.RemoteProtocolError` in library mode."""

    HTTPX_BASE = "RemoteProtocolError"
    kind = "protocol-error"


class ResponseHeadTooLarge(EndpointProtocolError):
    """The endpoint's response head has more header fields, or more bytes, than the client's
    limits allow (`PoolLimits.max_response_header_count` / `max_response_header_bytes`)."""


@dataclass(frozen=True)
class Attempt:
    """One try of a request: where it went, how it ended, how long it took."""

    endpoint: Endpoint | None
    cause: str
    elapsed: float
    status_code: int | None = None


class RetriesExhausted(MeshError):
    """Every attempt failed; `attempts` lists each one with its endpoint, cause and time."""

    def __init__(
        self, message: str, *, service: str | None = None, attempts: list[Attempt]
    ) -> None:
        lines = [message] + [
            f"  attempt {i}: {a.endpoint.id if a.endpoint else '-'}: {a.cause} "
            f"({a.elapsed * 1000:.1f} ms)"
            for i, a in enumerate(attempts, 1)
        ]
        super().__init__("\n".join(lines), service=service)
        self.attempts = attempts


class ConfigError(Exception):
    """A config file or plugin setting is wrong; the message names file, key path, expectation."""

    def __init__(self, message: str, *, source: str = "", path: str = "") -> None:
        prefix = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.source = source
        self.path = path
        self.reason = message


class PluginError(Exception):
    """A plugin in the plugin list is unknown, fails to import, or is not a valid plugin."""
