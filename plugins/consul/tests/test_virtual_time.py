"""Timing of the discovery loop in virtual time (trio's MockClock): the churn token bucket and
the error backoff. The agent here is an in-process httpx transport, since real sockets and a
jumping clock do not mix; the protocol itself is tested against real servers elsewhere."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from meshcore_consul import AgentConfig, ConsulDiscovery, TokenBucket
from meshcore_consul._agent import parse_agent_address
from trio.testing import MockClock

pytestmark = pytest.mark.anyio

GOOD = json.dumps([{"Service": {"Port": 7001, "Address": "127.0.0.1"}, "Checks": []}])


@pytest.fixture
def anyio_backend():
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Sink:
    def __init__(self) -> None:
        self.published: list[tuple[float, list]] = []
        self.errors: list[tuple[float, BaseException]] = []

    def publish(self, endpoints) -> None:
        self.published.append((anyio.current_time(), list(endpoints)))

    def error(self, exc) -> None:
        self.errors.append((anyio.current_time(), exc))


def discovery(handler, **kw) -> ConsulDiscovery:
    agent = AgentConfig(parse_agent_address("127.0.0.1:8500"), transport=httpx.MockTransport(handler))
    return ConsulDiscovery(agent, "api", **kw)


async def test_token_bucket_allows_a_burst_of_two_then_the_rate():
    bucket = TokenBucket(rate=10, burst=2)
    start = anyio.current_time()
    for _ in range(2):
        await bucket.take()
    assert anyio.current_time() == start
    for _ in range(10):
        await bucket.take()
    assert anyio.current_time() - start == pytest.approx(1.0)
    await anyio.sleep(5)  # idle: at most `burst` banked
    start = anyio.current_time()
    for _ in range(3):
        await bucket.take()
    assert anyio.current_time() - start == pytest.approx(0.1)


async def test_churning_agent_costs_at_most_the_churn_limit():
    index = iter(range(1, 10**6))

    def handler(request):
        return httpx.Response(200, text=GOOD, headers={"X-Consul-Index": str(next(index))})

    d = discovery(handler, churn_limit=20)
    sink = Sink()
    with anyio.move_on_after(20):
        await d.watch(sink)
    assert 20 * 20 <= d.requests <= 20 * 20 + 3


async def test_errors_back_off_exponentially_to_the_cap_and_reset_after_success():
    failing = True

    def handler(request):
        if failing:
            return httpx.Response(500, text="rpc error")
        return httpx.Response(200, text=GOOD, headers={"X-Consul-Index": "5"})

    d = discovery(handler, backoff=0.25, max_backoff=60.0)
    sink = Sink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.watch, sink)
        await anyio.sleep(600)
        # 0.25 s doubling to 60 s with full jitter: mean waits 0.125, 0.25, ... then 30 s
        assert 10 <= len(sink.errors) <= 60, len(sink.errors)
        gaps = [b[0] - a[0] for a, b in zip(sink.errors, sink.errors[1:])]
        assert max(gaps) <= 60.0 + 1e-6
        assert sum(gaps[-5:]) > 10  # capped phase: no longer sub-second
        failing = False
        await anyio.sleep(61)
        assert sink.published and sink.published[-1][1][0].port == 7001
        failing = True
        before = len(sink.errors)
        mark = anyio.current_time()
        await anyio.sleep(61)  # the blocking query (wait 60 s) returns, then fails again
        first_new = sink.errors[before][0]
        # after a success the backoff starts again from 0.25 s
        assert len(sink.errors) - before >= 3 and sink.errors[before + 1][0] - first_new <= 0.25
        assert first_new >= mark
        tg.cancel_scope.cancel()
