"""The one map from I/O errors to what the engine raises (as httpx maps httpcore's errors).

Client side, `endpoint_error`: a mesh error naming the endpoint, by the phase the connection
was in; the table is in docs/data-path.md ("Errors"). Server side, `client_error`: a
`RequestRejected` that ends the connection with an answer when one can still be sent.
Everything else (a handler's error, a parse error already mapped) passes through unchanged.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Literal

import anyio

from .._errors import EndpointConnectError, EndpointReadError, EndpointTimeout

if TYPE_CHECKING:
    from .._endpoints import Endpoint

# The errors that mean the connection broke, timed out or ended (TimeoutError is an OSError).
IO_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
    ssl.SSLError,
)

Phase = Literal["connect", "write", "read", "body"]
_DOING = {
    "write": "sending the request",
    "read": "reading the response",
    "body": "reading the response body",
}


class RequestRejected(Exception):
    """The request broke a limit or the protocol; the connection answers `status` and closes.

    Raised out of `request.stream` when the body is bad (chunk syntax, too large) or the client
    went away; a handler that lets it propagate gets the right answer sent for it.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def endpoint_error(
    exc: BaseException,
    endpoint: Endpoint,
    phase: Phase,
    timeout: float | None,
    *,
    stale: bool = False,
) -> Exception:
    """The mesh error for I/O error `exc` (one of IO_ERRORS) talking to `endpoint` in `phase`.

    `timeout` is the phase's limit (for the message). `stale`: the connection was reused and
    closed before any byte of the response came (RFC 9112 §9.3.1), so the request got no
    answer and may be sent again: replayable, and the connector resends it when it may.
    """
    eid = endpoint.id
    if isinstance(exc, TimeoutError):
        if phase == "connect":
            return EndpointTimeout(
                f"connecting to {eid} took longer than {timeout} s",
                endpoint=endpoint,
                replayable=True,
            )
        if phase == "body":
            return EndpointTimeout(
                f"no response data from {eid} for {timeout} s", endpoint=endpoint
            )
        return EndpointTimeout(f"{phase} timeout ({timeout} s) talking to {eid}", endpoint=endpoint)
    if phase == "connect":
        return EndpointConnectError(f"cannot connect to {eid}: {exc}", endpoint=endpoint)
    if stale:
        return EndpointReadError(
            f"{eid} closed a reused keep-alive connection before answering ({exc!r})",
            endpoint=endpoint,
            replayable=True,
        )
    if isinstance(exc, anyio.EndOfStream):
        where = (
            "in the middle of the response body"
            if phase == "body"
            else ("before a complete response head")
        )
        return EndpointReadError(f"{eid} closed the connection {where}", endpoint=endpoint)
    return EndpointReadError(
        f"connection to {eid} broke while {_DOING[phase]}: {exc!r}", endpoint=endpoint
    )


def client_error(exc: BaseException, doing: str, timeout: float | None = None) -> RequestRejected:
    """What a server connection answers when I/O error `exc` came while `doing` something with
    the client: 408 for a timeout (reading the body), else 400 (the client went away)."""
    if isinstance(exc, TimeoutError) and timeout is not None:
        return RequestRejected(408, f"no data from the client for {timeout} s while {doing}")
    return RequestRejected(400, f"client went away while {doing}: {exc!r}")
