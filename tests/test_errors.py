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


def test_deadline_exceeded_keeps_its_attempts_as_retries_exhausted_does():
    attempts = [meshcore.Attempt(EP, "EndpointTimeout: read", 0.4), meshcore.Attempt(EP, "status 503", 0.1, 503)]
    for error in (
        meshcore.DeadlineExceeded("deadline of 1 s exceeded", service="orders", attempts=attempts),
        meshcore.RetriesExhausted("2 attempts failed", service="orders", attempts=attempts),
    ):
        assert error.attempts == attempts
        assert error.service == "orders"
    assert meshcore.DeadlineExceeded("deadline of 1 s exceeded").attempts == []
