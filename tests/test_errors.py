"""The error hierarchy: httpx exceptions in library mode, and the failure kinds policies match on."""

from __future__ import annotations

import httpx
import pytest

import meshcore
from meshcore.testing import static_service

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


class Raises:
    """A layer that raises the error in hand, as the engine or a plugin would."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("raises", "layer")]

    @meshcore.hookimpl
    def meshcore_layer(self, kind, settings, upstream):
        if kind != "raises":
            return None

        def layer(inner):
            async def service(request):
                raise self.error

            return service

        return layer


MESH_ERRORS = [
    *(
        (error, httpx_type)
        for error, _, httpx_type in [
            (meshcore.EndpointConnectError("refused", endpoint=EP), None, httpx.ConnectError),
            (meshcore.EndpointTimeout("read", endpoint=EP), None, httpx.TimeoutException),
            (meshcore.EndpointReadError("reset", endpoint=EP), None, httpx.ReadError),
            (meshcore.EndpointProtocolError("bad", endpoint=EP), None, httpx.RemoteProtocolError),
            (meshcore.EndpointError("other", endpoint=EP), None, httpx.TransportError),
        ]
    ),
    (meshcore.DeadlineExceeded("late"), httpx.TimeoutException),
    (meshcore.NoEndpoints("none"), httpx.TransportError),
    (meshcore.CircuitOpen("open", retry_at=1.0), httpx.TransportError),
    (meshcore.RetriesExhausted("all failed", attempts=[]), httpx.TransportError),
    (meshcore.LocalRefusal("busy"), httpx.TransportError),
    (meshcore.IdentityRejected("who", endpoint=EP), httpx.ConnectError),
]


@pytest.mark.anyio
@pytest.mark.parametrize("error, httpx_type", MESH_ERRORS, ids=lambda v: type(v).__name__)
async def test_library_mode_raises_mesh_errors_as_httpx_exceptions(error, httpx_type, upstream):
    """The contract: in library mode `except httpx.HTTPError` (and the documented httpx class)
    catches every mesh error, which is still its meshcore type with its attributes."""
    config = {"services": {"orders": {**static_service([upstream()]), "resilience": ["raises"]}}}
    async with meshcore.Mesh(config, [], extra_plugins=[("raises", Raises(error))]) as mesh:
        async with mesh.client() as client:
            with pytest.raises(httpx.HTTPError) as info:
                await client.get("http://orders/x")
    assert info.value is error
    assert isinstance(error, httpx_type)
    assert type(error).__name__ == type(error).__mro__[1].__name__  # still named as its class
    assert info.value.request.url == "http://orders/x"
    assert str(error).startswith(error.args[0])


def test_deadline_exceeded_always_has_its_attempts():
    # docs/resilience.md promises `.attempts`; it used to exist only when the retry plugin's
    # timeout layer set it after construction.
    assert meshcore.DeadlineExceeded("late", service="orders").attempts == []
    attempt = meshcore.Attempt(EP, "timeout", 0.5)
    error = meshcore.DeadlineExceeded("late", service="orders", attempts=(attempt,))
    assert error.attempts == [attempt] and error.service == "orders"


def test_connect_error_is_replayable_unless_told_otherwise():
    assert meshcore.EndpointConnectError("refused").replayable
    assert not meshcore.EndpointConnectError("refused", replayable=False).replayable
    assert meshcore.EndpointConnectError("refused", endpoint=EP, service="s").endpoint == EP


def test_deadline_exceeded_keeps_its_attempts_as_retries_exhausted_does():
    attempts = [meshcore.Attempt(EP, "EndpointTimeout: read", 0.4), meshcore.Attempt(EP, "status 503", 0.1, 503)]
    for error in (
        meshcore.DeadlineExceeded("deadline of 1 s exceeded", service="orders", attempts=attempts),
        meshcore.RetriesExhausted("2 attempts failed", service="orders", attempts=attempts),
    ):
        assert error.attempts == attempts
        assert error.service == "orders"
    assert meshcore.DeadlineExceeded("deadline of 1 s exceeded").attempts == []


def test_describe_error_follows_the_cause_when_the_message_is_empty():
    try:
        try:
            raise ConnectionRefusedError("connection refused")
        except OSError as exc:
            raise TimeoutError() from exc
    except TimeoutError as exc:
        assert meshcore.describe_error(exc) == "TimeoutError: ConnectionRefusedError: connection refused"
    assert meshcore.describe_error(ValueError("bad")) == "ValueError: bad"
    assert meshcore.describe_error(TimeoutError()) == "TimeoutError"
