"""The engine's own answers to a malformed or over-limit request head (before any handler saw
the request) are counted with the sidecar's own answers: `meshcore_local_response_total` by
reason and status, and `/state`. Exact bytes over raw sockets, on asyncio, uvloop and trio."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

from meshcore._sidecar._metrics import REJECTED

from .conftest import admin_json, raw_exchange, running_sidecar, sidecar_config, static_service
from .test_metrics import BACKENDS, samples, scrape

pytestmark = pytest.mark.anyio

LIMITS = dict(
    max_request_line=256,
    max_header_count=20,
    max_header_bytes=2048,
    max_body=10_000,
    header_timeout=0.3,
)

CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n"

# (request bytes, status, reason)
HEADS = [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/9.9\r\nHost: orders\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),  # HTTP/1.1 without Host
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad_request"),  # a Host that is no host
    (b"GET / HTTP/1.1\r\nHost: orders\r\nHost: users\r\n\r\n", 400, "bad_request"),
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: orders\r\n\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: orders\r\nX-Big: " + b"b" * 3000 + b"\r\n\r\n", 431, "headers_too_large"),
    (
        b"GET / HTTP/1.1\r\nHost: orders\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n",
        431,
        "headers_too_large",
    ),
    (b"POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 20000\r\n\r\n", 413, "body_too_large"),
    # A chunk extension past Go's allowance in the same read as the head.
    (CHUNKED_HEAD + b"1;" + b"e" * 20000 + b"\r\nx\r\n", 400, "bad_request"),
]


def _key(direction: str, service: str, reason: str, status: int) -> str:
    return (
        f'meshcore_local_response_total{{direction="{direction}",service="{service}",'
        f'reason="{reason}",status_code="{status}"}}'
    )


async def _head_timeout(address: object) -> bytes:
    """Half a head, then silence: 408 after `header_timeout`."""
    stream = await anyio.connect_tcp(address.host, address.port)  # type: ignore[attr-defined]
    received = b""
    async with stream:
        await stream.send(b"GET / HTTP/1.1\r\nHost: ord")
        with anyio.fail_after(5):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_each_malformed_head_counts_its_reason(upstream):
    server = upstream()
    config = sidecar_config({"orders": static_service([server])}, service="me", **LIMITS)
    async with running_sidecar(config) as sidecar:
        expected: Counter[tuple[str, str, str, int]] = Counter()
        for direction, service in (("outbound", "unknown"), ("inbound", "me")):
            for data, status, reason in HEADS:
                before = samples(await scrape(sidecar)).get(_key(direction, service, reason, status), 0)
                answer = await raw_exchange(sidecar, direction, data)
                assert answer.startswith(b"HTTP/1.1 %d " % status), (data[:60], answer[:200])
                after = samples(await scrape(sidecar))[_key(direction, service, reason, status)]
                assert after == before + 1, (direction, data[:60])
                expected[(direction, service, reason, status)] += 1
            answer = await _head_timeout(sidecar.addresses[direction])
            assert answer.startswith(b"HTTP/1.1 408 ")
            expected[(direction, service, "request_timeout", 408)] += 1
        m = samples(await scrape(sidecar))
        state = await admin_json(sidecar)
    for (direction, service, reason, status), n in expected.items():
        assert m[_key(direction, service, reason, status)] == n
    # Only the engine's reasons: a stray client of another run that reuses the port may add
    # `no_route` answers, which are not what this test is about.
    engine = set(REJECTED.values())
    local = {
        tuple(e["labels"]): e["value"]
        for e in state["sidecar"]["telemetry"]["local_errors"]
        if e["labels"][2] in engine
    }
    assert local == {(d, s, r): n for (d, s, r, _), n in expected.items()}
    # None of them reached the app.
    assert server.requests == 0


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_good_request_after_counts_nothing(upstream):
    """A request that reaches the handler is not counted as the engine's answer."""
    server = upstream()
    config = sidecar_config({"orders": static_service([server])}, **LIMITS)
    async with running_sidecar(config) as sidecar:
        answer = await raw_exchange(
            sidecar, "outbound", b"GET / HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert not [k for k in sidecar.telemetry.local_errors if k[2] in set(REJECTED.values())]


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_body_breaking_the_limit_inside_the_handler_is_counted_once(upstream):
    """What the handler saw (a chunked body over max_body, read after the head reached it) is
    the handler's to count; the engine's callback does not count it again."""
    server = upstream()
    config = sidecar_config({"orders": static_service([server])}, **LIMITS)
    async with running_sidecar(config) as sidecar:
        address = sidecar.addresses["outbound"]
        async with await anyio.connect_tcp(address.host, address.port) as stream:
            await stream.send(CHUNKED_HEAD + b"10\r\n" + b"x" * 16 + b"\r\n")
            with anyio.fail_after(5):
                while sidecar.requests.count == 0 and not server.requests:
                    await anyio.sleep(0.005)  # the head reached the handler
            await stream.send(b"3000\r\n" + b"x" * 0x3000 + b"\r\n0\r\n\r\n")
            received = b""
            with anyio.fail_after(5):
                while True:
                    try:
                        received += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        assert received.startswith(b"HTTP/1.1 413 ")
        engine = set(REJECTED.values())
        counted = {k: n for k, n in sidecar.telemetry.local_errors.items() if k[2] in engine}
        assert counted == {("outbound", "orders", "body_too_large"): 1}
