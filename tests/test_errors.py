"""The error hierarchy: httpx subclasses, and the failure kinds policies match on."""

from __future__ import annotations

import httpx
import pytest

import meshcore

EP = meshcore.Endpoint.parse("127.0.0.1:9")


@pytest.mark.parametrize(
    "error, kind, httpx_type",
    [
        (meshcore.EndpointConnectError("refused", endpoint=EP), "connect-failure", httpx.ConnectError),
        (meshcore.EndpointTimeout("connect", endpoint=EP, replayable=True), "connect-failure", httpx.TimeoutException),
        (meshcore.EndpointTimeout("read", endpoint=EP), "timeout", httpx.TimeoutException),
        (meshcore.EndpointReadError("reset", endpoint=EP), "reset", httpx.ReadError),
        (meshcore.EndpointProtocolError("bad", endpoint=EP), "protocol-error", httpx.RemoteProtocolError),
        (meshcore.EndpointError("other", endpoint=EP), None, httpx.TransportError),
    ],
)
def test_endpoint_errors_name_their_kind(error, kind, httpx_type):
    assert error.kind == kind
    assert kind is None or kind in meshcore.EndpointError.KINDS
    assert isinstance(error, httpx_type)


def test_deadline_exceeded_always_has_its_attempts():
    # docs/resilience.md promises `.attempts`; it used to exist only when the retry plugin's
    # timeout layer set it after construction.
    assert meshcore.DeadlineExceeded("late", service="orders").attempts == []
    attempt = meshcore.Attempt(EP, "timeout", 0.5)
    error = meshcore.DeadlineExceeded("late", service="orders", attempts=(attempt,))
    assert error.attempts == [attempt] and error.service == "orders"
    assert isinstance(error, httpx.TimeoutException)


def test_connect_error_is_replayable_unless_told_otherwise():
    assert meshcore.EndpointConnectError("refused").replayable
    assert not meshcore.EndpointConnectError("refused", replayable=False).replayable
    assert meshcore.EndpointConnectError("refused", endpoint=EP, service="s").endpoint == EP
