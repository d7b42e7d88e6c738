"""Retry behaviour through a real mesh pipeline with a scripted terminal, in virtual time.

On trio the tests run under MockClock (virtual time: exact, instant). On asyncio, which has no
virtual clock, the tests whose waits are short run in real time with the same assertions on
lower bounds and loose upper bounds; the long-wait ones are trio-only.
"""

from __future__ import annotations

import anyio
import pytest
from retry_testkit import PORTS, connect_error, read_error

import meshcore
from meshcore.testing import virtual_trio

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["trio-virtual", "asyncio"])
def anyio_backend(request):
    if request.param == "asyncio":
        return "asyncio"
    import trio.testing

    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def virtual(backend) -> bool:
    return isinstance(backend, tuple)


# Tests of long virtual waits run on trio's MockClock only (they are about virtual time).
VIRTUAL_ONLY = pytest.mark.parametrize("anyio_backend", [virtual_trio()])


def request(method: str = "GET", body: bytes | object = b"", **ext) -> meshcore.Request:
    return meshcore.Request(method, "http://svc/x", stream=body, extensions=ext)


async def test_connect_failures_go_to_other_endpoints_then_exhaust(scripted_mesh, anyio_backend):
    def script(port, req, n):
        raise connect_error(port)

    mesh, conn = scripted_mesh(script)
    async with mesh:
        start = anyio.current_time()
        with pytest.raises(meshcore.RetriesExhausted) as info:
            await mesh.send(request())
        elapsed = anyio.current_time() - start
    ports = [port for _, port, _, _ in conn.log]
    assert len(ports) == 3 and len(set(ports)) == 3, "each retry must go to a new endpoint"
    attempts = info.value.attempts
    assert [a.endpoint.port for a in attempts] == ports
    assert all("EndpointConnectError" in a.cause for a in attempts)
    assert "3 attempts failed" in str(info.value) and "attempt 3: 127.0.0.1:" in str(info.value)
    assert isinstance(info.value.__cause__, meshcore.EndpointConnectError)
    # Full jitter: retry 1 waits U(0, 25 ms), retry 2 U(0, 75 ms). The bounds are exact in
    # virtual time only: on a real clock a loaded machine adds its own delay to every wait.
    times = [t for t, _, _, _ in conn.log]
    assert 0 <= times[1] - times[0] and 0 <= times[2] - times[1]
    if virtual(anyio_backend):
        assert times[1] - times[0] <= 0.025 and times[2] - times[1] <= 0.075
        assert elapsed <= 0.1


def test_backoff_is_full_jitter_and_capped():
    from meshcore_retry import RetryPolicy

    policy = RetryPolicy()
    for retry, ceiling in [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (9, 0.25)]:
        samples = [policy.backoff(retry) for _ in range(2000)]
        assert 0 <= min(samples) and max(samples) <= ceiling
        assert max(samples) > ceiling * 0.9, "jitter should use the whole range"
        assert abs(sum(samples) / len(samples) - ceiling / 2) < ceiling * 0.1


async def test_status_retry_then_success_closes_the_discarded_response(scripted_mesh, anyio_backend):
    mesh, conn = scripted_mesh(lambda port, req, n: 503 if port == PORTS[1] else 200)
    async with mesh:
        for _ in range(6):
            response = await mesh.send(request())
            assert response.status_code == 200
    failed = [b for b, (_, port, _, _) in zip(conn.bodies, conn.log) if port == PORTS[1]]
    assert failed and all(b.closed for b in failed), "a retried-past response must be closed"


async def test_final_retryable_status_is_returned_not_raised(scripted_mesh, anyio_backend):
    mesh, conn = scripted_mesh(lambda port, req, n: 503)
    async with mesh:
        req = request()
        response = await mesh.send(req)
    assert response.status_code == 503
    assert len(conn.log) == 3
    assert [a.status_code for a in req.extensions["meshcore.attempts"]] == [503, 503, 503]
    assert not conn.bodies[-1].closed, "the returned response is the caller's to read"


async def test_post_503_is_not_retried_but_connect_failure_is(scripted_mesh, anyio_backend):
    def script(port, req, n):
        if req.url.target == "/refused" and port == PORTS[1]:
            raise connect_error(port)
        if req.url.target == "/reset":
            raise read_error(port)
        return 503 if req.url.target == "/x" else 200

    mesh, conn = scripted_mesh(script)
    async with mesh:
        response = await mesh.send(request("POST", b"data"))
        assert response.status_code == 503 and len(conn.log) == 1
        conn.log.clear()
        for _ in range(3):
            ok = await mesh.send(meshcore.Request("POST", "http://svc/refused", stream=b"d"))
            assert ok.status_code == 200
        assert len(conn.log) == 4, "the one refused connection is replayed elsewhere"
        conn.log.clear()
        with pytest.raises(meshcore.EndpointReadError):
            await mesh.send(meshcore.Request("POST", "http://svc/reset", stream=b"d"))
        assert len(conn.log) == 1, "a POST that may have reached the server is not resent"
        conn.log.clear()
        with pytest.raises(meshcore.RetriesExhausted):
            await mesh.send(meshcore.Request("PUT", "http://svc/reset", stream=b"d"))
        assert len(conn.log) == 3, "PUT is idempotent"


async def test_non_endpoint_errors_are_not_retried(scripted_mesh, anyio_backend):
    calls = []

    def script(port, req, n):
        calls.append(port)
        raise meshcore.CircuitOpen("open", service="svc", retry_at=0.0)

    mesh, _conn = scripted_mesh(script)
    async with mesh:
        with pytest.raises(meshcore.CircuitOpen):
            await mesh.send(request())
    assert len(calls) == 1


@VIRTUAL_ONLY
async def test_retry_after_seconds_is_honoured(scripted_mesh, anyio_backend):
    mesh, conn = scripted_mesh(
        lambda port, req, n: (503, [("retry-after", "2")]) if len(conn.log) == 1 else 200
    )
    async with mesh:
        response = await mesh.send(request())
    assert response.status_code == 200
    assert conn.log[1][0] - conn.log[0][0] == pytest.approx(2.0)


@VIRTUAL_ONLY
async def test_retry_after_past_the_deadline_returns_the_response_at_once(
    scripted_mesh, anyio_backend
):
    mesh, conn = scripted_mesh(
        lambda port, req, n: (503, [("retry-after", "30")]),
        resilience=["timeout", "retry"],
        timeout={"deadline": "5s"},
    )
    async with mesh:
        start = anyio.current_time()
        response = await mesh.send(request())
        assert anyio.current_time() - start < 0.001
    assert response.status_code == 503 and len(conn.log) == 1


def test_parse_retry_after():
    from meshcore_retry import parse_retry_after

    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now_wall=now) == pytest.approx(10.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now_wall=now) == 0.0


@VIRTUAL_ONLY
async def test_deadline_covers_every_retry_and_lists_attempts(scripted_mesh, anyio_backend):
    mesh, conn = scripted_mesh(
        lambda port, req, n: 10.0,  # every endpoint hangs 10 s
        resilience=["timeout", "retry"],
        timeout={"deadline": "1s"},
        retry={"per_try_timeout": "400ms"},
    )
    async with mesh:
        start = anyio.current_time()
        with pytest.raises(meshcore.DeadlineExceeded) as info:
            await mesh.send(request())
        assert anyio.current_time() - start == pytest.approx(1.0)
    assert "deadline of 1 s exceeded" in str(info.value)
    assert len(info.value.attempts) == 2
    assert all("EndpointTimeout" in a.cause for a in info.value.attempts)
    assert len({port for _, port, _, _ in conn.log}) == 3


async def test_per_try_timeout_moves_on_to_a_healthy_endpoint(scripted_mesh, anyio_backend):
    slow = PORTS[0]
    mesh, _conn = scripted_mesh(
        lambda port, req, n: 10.0 if port == slow else 200,
        retry={"per_try_timeout": "50ms"},
    )
    async with mesh:
        for _ in range(4):
            assert (await mesh.send(request())).status_code == 200
        state = mesh.state()["services"]["svc"]
    slow_stats = next(e for e in state["endpoints"] if e["port"] == slow)
    assert slow_stats["failures"] >= 1, "the sender's timeout is an outcome the mesh records"


@VIRTUAL_ONLY
async def test_timeout_layer_alone_and_per_request_override(scripted_mesh, anyio_backend):
    mesh, _conn = scripted_mesh(
        lambda port, req, n: 3.0, resilience=["timeout"], timeout={"deadline": "1s"}
    )
    async with mesh:
        with pytest.raises(meshcore.DeadlineExceeded):
            await mesh.send(request())
        assert (await mesh.send(request(**{"meshcore.timeout": None}))).status_code == 200
        start = anyio.current_time()
        with pytest.raises(meshcore.DeadlineExceeded):
            await mesh.send(request(**{"meshcore.timeout": 0.5}))
        assert anyio.current_time() - start == pytest.approx(0.5)
        with pytest.raises(ValueError, match="meshcore.timeout"):
            await mesh.send(request(**{"meshcore.timeout": "soon"}))
        assert mesh.state()["services"]["svc"]["timeout"]["exceeded"] == 2


async def test_per_request_override(scripted_mesh, anyio_backend):
    def script(port, req, n):
        raise connect_error(port)

    mesh, conn = scripted_mesh(script)
    async with mesh:
        with pytest.raises(meshcore.EndpointConnectError):
            await mesh.send(request(**{"meshcore.retry": False}))
        assert len(conn.log) == 1
        conn.log.clear()
        with pytest.raises(meshcore.RetriesExhausted) as info:
            await mesh.send(request(**{"meshcore.retry": {"attempts": 2}}))
        assert len(conn.log) == 2 and len(info.value.attempts) == 2
        conn.log.clear()
        with pytest.raises(meshcore.EndpointConnectError):
            await mesh.send(request(**{"meshcore.retry": {"retry_on": ["reset"]}}))
        assert len(conn.log) == 1
        for bad, message in [
            ({"attempts": 0}, "attempts"),
            ({"tries": 2}, "unknown key 'tries'"),
            ({"retry_on": ["explode"]}, "retry_on"),
            ("yes", "expected False, True or a dict"),
        ]:
            with pytest.raises(ValueError, match=message):
                await mesh.send(request(**{"meshcore.retry": bad}))


async def test_streamed_body_is_buffered_and_replayed_up_to_the_limit(scripted_mesh, anyio_backend):
    def script(port, req, n):
        if len(conn.log) == 1:
            raise connect_error(port)
        return 200

    mesh, conn = scripted_mesh(script, retry={"buffer_limit": 1000})

    def stream(size: int, chunk: int = 100):
        async def gen():
            for i in range(0, size, chunk):
                yield b"z" * min(chunk, size - i)

        return gen()

    async with mesh:
        assert (await mesh.send(request("POST", stream(1000)))).status_code == 200
        assert [b for _, _, _, b in conn.log] == [b"z" * 1000] * 2
        conn.log.clear()
        with pytest.raises(meshcore.EndpointConnectError):
            await mesh.send(request("POST", stream(1500)))
        assert [len(b) for _, _, _, b in conn.log] == [1500], "too large: sent once, whole"
        conn.log.clear()
        with pytest.raises(meshcore.EndpointConnectError):
            await mesh.send(request("POST", b"y" * 1001))
        assert len(conn.log) == 1
        assert mesh.state()["services"]["svc"]["retry"]["body_too_large_or_streamed"] == 2


async def test_budget_denies_retries_and_counts_them(scripted_mesh, anyio_backend):
    def script(port, req, n):
        raise connect_error(port)

    mesh, _conn = scripted_mesh(
        script, retry={"budget_ratio": 0.0, "budget_min_per_second": 0.2, "budget_ttl": "10s"}
    )
    async with mesh:
        # Reserve: 0.2/s x 10 s = 2 retries in the window, then the original error alone.
        with pytest.raises(meshcore.RetriesExhausted):
            await mesh.send(request())
        with pytest.raises(meshcore.EndpointConnectError) as info:
            await mesh.send(request())
        assert not isinstance(info.value, meshcore.RetriesExhausted)
        budget = mesh.state()["services"]["svc"]["retry"]["budget"]
    assert budget["retries"] == 2 and budget["denied"] == 1 and budget["requests"] == 2


@VIRTUAL_ONLY
async def test_budget_recovers_after_its_window(scripted_mesh, anyio_backend):

    def script(port, req, n):
        raise connect_error(port)

    mesh, _conn = scripted_mesh(
        script, retry={"budget_ratio": 0.0, "budget_min_per_second": 0.1, "budget_ttl": "10s"}
    )
    async with mesh:
        with pytest.raises(meshcore.RetriesExhausted):
            await mesh.send(request(**{"meshcore.retry": {"attempts": 2}}))
        with pytest.raises(meshcore.EndpointConnectError):
            await mesh.send(request())
        await anyio.sleep(11)
        with pytest.raises(meshcore.RetriesExhausted):
            await mesh.send(request(**{"meshcore.retry": {"attempts": 2}}))


async def test_each_retry_excludes_the_endpoints_already_tried(scripted_mesh, anyio_backend):
    # A balancer that always picks the first endpoint: only the exclusion moves a retry.
    def script(port, req, n):
        if port != PORTS[2]:
            raise connect_error(port)
        return 200

    mesh, conn = scripted_mesh(script, balancer="test-first")
    async with mesh:
        response = await mesh.send(request())
    assert response.status_code == 200
    assert [port for _, port, _, _ in conn.log] == list(PORTS)


@VIRTUAL_ONLY
async def test_an_attempt_cut_by_the_deadline_counts_against_its_endpoint(
    scripted_mesh, anyio_backend
):
    """The timeout layer's deadline cancels the attempt in flight: its endpoint gets a failed
    outcome (an EndpointTimeout), as Envoy's outlier detection counts a route timeout against
    the host; otherwise an endpoint that always outlasts the deadline would never be seen
    failing. The caller's own cancellation is not the endpoint's doing and is not counted."""
    slow = PORTS[0]
    mesh, conn = scripted_mesh(
        lambda port, req, n: 10.0 if port == slow else 200,
        resilience=["timeout"],
        timeout={"deadline": "1s"},
    )
    async with mesh:
        outcomes: list[meshcore.Outcome] = []
        mesh.upstream("svc").add_observer(outcomes.append)
        errors = 0
        for _ in range(3):  # round robin: one of the three goes to the slow endpoint
            try:
                await mesh.send(request())
            except meshcore.DeadlineExceeded:
                errors += 1
        assert errors == 1
        for _ in range(3):  # until the slow endpoint is tried again, by a caller that
            with anyio.move_on_after(0.1):  # gives up long before the deadline
                await mesh.send(request())
            if [port for _, port, _, _ in conn.log].count(slow) == 2:
                break
        assert [port for _, port, _, _ in conn.log].count(slow) == 2
        stats = next(e for e in mesh.state()["services"]["svc"]["endpoints"] if e["port"] == slow)
    slow_outcomes = [o for o in outcomes if o.endpoint.port == slow]
    assert len(slow_outcomes) == 1
    assert isinstance(slow_outcomes[0].error, meshcore.EndpointTimeout)
    assert slow_outcomes[0].elapsed == pytest.approx(1.0)
    assert stats["failures"] == 1 and stats["in_flight"] == 0


@VIRTUAL_ONLY
async def test_without_per_try_timeout_a_hung_instance_costs_a_share_of_the_deadline(
    scripted_mesh, anyio_backend
):
    """Unset, the per-try timeout is deadline / attempts (15 s / 3 = 5 s): a request routed to
    a hung instance moves on to a healthy one after 5 s instead of failing at 15 s, and the
    timeout counts against the hung instance."""
    hung = PORTS[0]
    mesh, conn = scripted_mesh(
        lambda port, req, n: 3600.0 if port == hung else 200,
        resilience=["timeout", "retry"],
    )
    async with mesh:
        start = anyio.current_time()
        statuses = [(await mesh.send(request())).status_code for _ in range(3)]
        elapsed = anyio.current_time() - start
        state = mesh.state()["services"]["svc"]
    assert statuses == [200, 200, 200]
    assert elapsed == pytest.approx(5.0, abs=0.3)  # one 5 s try on the hung one, plus backoff
    hung_stats = next(e for e in state["endpoints"] if e["port"] == hung)
    assert (hung_stats["requests"], hung_stats["failures"]) == (1, 1)
    assert sum(1 for _, port, _, _ in conn.log if port == hung) == 1
