"""Timing of the shared watch in virtual time (trio's MockClock): the status probe leaves a
silent member after exactly `probe_interval + probe_timeout`, backoff happens only once every
member failed in a row (full jitter, capped), and a member that answers resets it. The cluster
here is an in-process httpx transport, since real sockets and a jumping clock do not mix; the
protocol itself is tested against a real cluster elsewhere."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from meshcore_etcd import ClusterConfig, EtcdDiscovery, WatchOptions
from trio.testing import MockClock

from meshcore.testing.conformance.discovery import RecordingSink

pytestmark = pytest.mark.anyio

MEMBERS = ("http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379")


@pytest.fixture
def anyio_backend() -> Any:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def range_answer() -> dict[str, Any]:
    value = base64.b64encode(json.dumps({"Addr": "127.0.0.1:7001"}).encode()).decode()
    key = base64.b64encode(b"meshcore/services/orders/a").decode()
    return {"header": {"revision": "5"}, "kvs": [{"key": key, "value": value, "mod_revision": "5"}]}


async def held_stream() -> AsyncIterator[bytes]:
    yield b'{"result":{"header":{"revision":"5"},"created":true}}\n'
    await anyio.sleep_forever()


def discovery(handler: Callable[[httpx.Request], Any], **kw: Any) -> EtcdDiscovery:
    cluster = ClusterConfig(endpoints=MEMBERS, timeout=1.0, transport=httpx.MockTransport(handler))
    return EtcdDiscovery(WatchOptions(cluster, **kw), "orders")


async def run_for(d: EtcdDiscovery, sink: RecordingSink, seconds: float) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.watch, sink)
        await anyio.sleep(seconds)
        tg.cancel_scope.cancel()


async def test_a_silent_member_is_left_after_probe_interval_plus_timeout():
    calls: list[tuple[float, str, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        member = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        calls.append((anyio.current_time(), member, request.url.path))
        if request.url.path == "/v3/kv/range":
            return httpx.Response(200, json=range_answer())
        if request.url.path == "/v3/watch":
            return httpx.Response(200, content=held_stream())
        if member == MEMBERS[0]:
            await anyio.sleep_forever()  # the first member is frozen: status never answers
        return httpx.Response(200, json={"header": {}, "leader": "7"})

    sink = RecordingSink()
    start = anyio.current_time()
    await run_for(discovery(handler, probe_interval=2.0, probe_timeout=1.5), sink, 10)
    watches = [(t - start, m) for t, m, p in calls if p == "/v3/watch"]
    assert watches == [(0.0, MEMBERS[0]), (3.5, MEMBERS[1])]  # interval + timeout, then stays
    probes = [round(t - start, 3) for t, m, p in calls if p == "/v3/maintenance/status" and m == MEMBERS[1]]
    assert probes == [5.5, 7.5, 9.5]
    assert "no status answer within 1.5 s" in str(sink.errors[0])
    assert [ep.port for ep in sink.published[0]] == [7001] and len(sink.published) == 1


async def test_backoff_only_after_every_member_failed_then_capped_with_jitter():
    calls: list[tuple[float, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append((anyio.current_time(), str(request.url)))
        raise httpx.ConnectError("refused", request=request)

    sink = RecordingSink()
    await run_for(discovery(handler, backoff=0.25, max_backoff=4.0), sink, 120)
    times = [t for t, _ in calls]
    rounds = [times[i:i + 3] for i in range(0, len(times) - 2, 3)]
    # within a round of three members: no wait at all
    assert all(r[0] == r[1] == r[2] for r in rounds)
    gaps = [b[0] - a[2] for a, b in zip(rounds, rounds[1:])]
    assert all(0 <= g <= 4.0 for g in gaps)
    assert len(set(gaps)) > len(gaps) // 2  # jittered, not in step
    # with the cap at 4 s and full jitter (mean 2 s), about 60 rounds in 120 s; never a spin
    assert 30 <= len(rounds) <= 150, len(rounds)
    assert len(sink.errors) == len(calls) and sink.published == []


async def test_a_member_that_answers_resets_the_backoff():
    state = {"up": False}
    calls: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(anyio.current_time())
        if not state["up"]:
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/v3/kv/range":
            return httpx.Response(200, json=range_answer())
        if request.url.path == "/v3/watch":
            return httpx.Response(200, content=held_stream())
        return httpx.Response(200, json={"header": {}, "leader": "7"})

    sink = RecordingSink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery(handler, backoff=1.0, max_backoff=60.0, probe_interval=100).watch, sink)
        await anyio.sleep(300)  # long enough for the backoff to reach its cap
        state["up"] = True
        before = anyio.current_time()
        await sink.wait_for(lambda: bool(sink.published), 61, "the first answer")
        assert anyio.current_time() - before <= 60.0  # at most one capped wait
        tg.cancel_scope.cancel()
