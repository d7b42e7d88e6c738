"""What the sidecar answers itself: the `x-meshcore-error` codes and their statuses.

Errors the sidecar answers itself carry `x-meshcore-error: <code>` so an application can tell a
mesh failure from its upstream's own status, and a text body saying what happened. Statuses
follow Envoy's: 404 no route, 503 no healthy upstream / connect failure / breaker open / local
refusal, 504 upstream timeout, 502 anything else the upstream did wrong. `CODES` is the one
table: a code's status is looked up there, so a code cannot be sent without being listed (and
docs/sidecar.md lists every one; tests/sidecar/test_answers.py checks both).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio

from .._errors import (
    CircuitOpen,
    DeadlineExceeded,
    EndpointConnectError,
    EndpointError,
    EndpointTimeout,
    IdentityRejected,
    LocalRefusal,
    MeshError,
    NoEndpoints,
    ResponseHeadTooLarge,
    RetriesExhausted,
)
from .._models import Headers, Response

__all__ = ["CODES", "Refused", "Tracked", "classify", "first_line", "local_response"]

# code -> status
CODES: dict[str, int] = {
    "bad_path": 400,
    "bad_header": 400,
    "path_redirect": 307,
    "no_route": 404,
    "denied": 403,
    "no_endpoints": 503,
    "circuit_open": 503,
    "local_refusal": 503,
    "connect_failed": 503,
    "app_unreachable": 503,
    "timeout": 504,
    "retries_exhausted": 502,
    "identity_rejected": 502,
    "upstream_head_too_large": 502,
    "upstream_error": 502,
    "mesh_error": 502,
    "internal": 500,
}


class Refused(Exception):
    """A request the sidecar answers itself before sending it anywhere (no route, denied)."""

    def __init__(
        self, code: str, message: str, service: str, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.service = service
        self.extra = extra


def _retry_after(seconds: float) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"retry-after", b"%d" % max(1, round(seconds))),)


def classify(exc: BaseException) -> tuple[str, Sequence[tuple[bytes, bytes]]]:
    """The code for a pipeline error, and the extra headers its answer carries."""
    if isinstance(exc, RetriesExhausted):
        return "retries_exhausted", ()
    if isinstance(exc, NoEndpoints):
        return "no_endpoints", ()
    if isinstance(exc, CircuitOpen):
        return "circuit_open", _retry_after(max(0.0, exc.retry_at - anyio.current_time()))
    if isinstance(exc, LocalRefusal):
        return "local_refusal", () if exc.retry_after is None else _retry_after(exc.retry_after)
    if isinstance(exc, (DeadlineExceeded, EndpointTimeout)):
        return "timeout", ()
    if isinstance(exc, EndpointConnectError):
        return "connect_failed", ()
    if isinstance(exc, IdentityRejected):
        return "identity_rejected", ()
    if isinstance(exc, ResponseHeadTooLarge):
        return "upstream_head_too_large", ()
    if isinstance(exc, EndpointError):
        return "upstream_error", ()
    if isinstance(exc, MeshError):
        return "mesh_error", ()
    return "internal", ()


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def local_response(
    code: str, message: str, done: Callable[[], None], draining: bool,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> Response:
    """The answer for `code`: its status, `x-meshcore-error`, and `message` as a text body."""
    body = f"meshcore: {message}\n".encode()
    headers = Headers.__new__(Headers)
    headers.extend(
        (
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"x-meshcore-error", code.encode()),
            *extra,
        )
    )
    if draining:
        headers.append((b"connection", b"close"))
    return Response(CODES[code], headers, Tracked(body, done))


class Tracked:
    """A response body that tells the sidecar when the response is over.

    Iterating hands out the wrapped body's own iterator, so there is no per-chunk overhead;
    the engine closes the body when the response is written (or the client went away).
    """

    __slots__ = ("body", "done")

    def __init__(self, body: Any, done: Callable[[], None] | None) -> None:
        self.body = body
        self.done = done

    def __aiter__(self) -> AsyncIterator[bytes]:
        body = self.body
        if isinstance(body, bytes):
            return _once(body)
        return body.__aiter__()  # type: ignore[no-any-return]  # the body is any async iterable of bytes

    async def aclose(self) -> None:
        try:
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            done, self.done = self.done, None
            if done is not None:
                done()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
