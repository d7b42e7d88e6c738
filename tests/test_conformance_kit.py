"""The conformance suites catch the bugs a plugin author really writes.

Each test writes a plugin with one deliberate bug and a subclass of the suite, runs it with
pytester (as the author's own project would run it), and checks that the suite FAILS on it,
saying why; the same plugin without the bug passes, so the check is not one that always fails.
"""

from __future__ import annotations

import time

import anyio
import pytest

from meshcore.testing._blocking import LoopBlockingCheck

pytest_plugins = ["pytester"]

# -- balancers -----------------------------------------------------------------------------------

BALANCER = '''
import zlib

import meshcore
from meshcore.testing.conformance.balancer import BalancerConformance


class HashBalancer:
    """Sticky by the x-user-id header; round-robin for requests without it."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.turn = 0

    def pick(self, snapshot, request, exclude):
        endpoints = snapshot.endpoints
        key = request.headers.get("x-user-id")
        if key is not None and BUGGY:
            return endpoints[zlib.crc32(key.encode()) % len(endpoints)]  # ejection ignored
        healthy = [ep for ep in endpoints if not self.upstream.is_ejected(ep)]
        if not healthy:
            self.upstream.count_panic()
            healthy = list(endpoints)
        candidates = [ep for ep in healthy if ep not in exclude] or healthy
        if key is not None:
            return candidates[zlib.crc32(key.encode()) % len(candidates)]
        self.turn += 1
        return candidates[self.turn % len(candidates)]


class Plugin:
    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("user-hash", "balancer")]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind, settings, upstream):
        if kind != "user-hash" and not GREEDY:
            return None
        return HashBalancer(upstream)


class TestUserHash(BalancerConformance):
    kind = "user-hash"
    extra_plugins = [("user-hash", Plugin())]
'''


def run_suite(
    pytester: pytest.Pytester, source: str, select: str, **flags: object
) -> pytest.RunResult:
    header = "".join(f"{name} = {value!r}\n" for name, value in flags.items())
    pytester.makepyfile(test_suite=header + source)
    return pytester.runpytest("-k", select, "-p", "no:cacheprovider")


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("MESHCORE_PLUGINS", raising=False)
    return pytester


def test_balancer_suite_catches_a_header_hash_that_ignores_ejection(suite: pytest.Pytester) -> None:
    select = "ejected or exclude or real_upstream or panic"
    broken = run_suite(suite, BALANCER, select, BUGGY=True, GREEDY=False)
    outcomes = broken.parseoutcomes()
    assert outcomes.get("failed", 0) >= 2, broken.stdout.str()
    broken.stdout.fnmatch_lines(["*FAILED*test_never_picks_an_ejected_endpoint*"])
    fixed = run_suite(suite, BALANCER, select, BUGGY=False, GREEDY=False)
    assert fixed.ret == 0, fixed.stdout.str()


def test_balancer_suite_catches_a_factory_answering_for_other_kinds(suite: pytest.Pytester) -> None:
    select = "own_kinds"
    broken = run_suite(suite, BALANCER, select, BUGGY=False, GREEDY=True)
    broken.assert_outcomes(failed=2)
    broken.stdout.fnmatch_lines(
        ["*plugin 'user-hash': meshcore_balancer(kind='not-user-hash') answered*must return None*"]
    )
    run_suite(suite, BALANCER, select, BUGGY=False, GREEDY=False).assert_outcomes(passed=2)


# -- layers --------------------------------------------------------------------------------------

LAYER = '''
import anyio

import meshcore
from meshcore.testing.conformance.layer import LayerConformance


class Limit:
    """At most `limit` requests at once; the rest are refused with 503."""

    def __init__(self, limit):
        self.limit = limit
        self.active = 0
        self.lock = anyio.Lock()

    def __call__(self, inner):
        async def service(request):
            if self.active >= self.limit:
                return meshcore.Response(503)
            self.active += 1
            if LEAKS:
                try:
                    response = await inner(request)
                except Exception:  # cancellation is not an Exception: the slot is kept
                    self.active -= 1
                    raise
                self.active -= 1
                return response
            try:
                if LOCKS:
                    async with self.lock:  # held across the inner call
                        return await inner(request)
                return await inner(request)
            finally:
                self.active -= 1

        return service


class Plugin:
    @meshcore.hookimpl
    def meshcore_kinds(self):
        settings = {"limit": meshcore.Setting("int", 8, "requests at once", min=1)}
        return [meshcore.Kind("limit", "layer", settings)]

    @meshcore.hookimpl
    def meshcore_layer(self, kind, settings, upstream):
        return Limit(settings.limit) if kind == "limit" else None


class TestLimit(LayerConformance):
    kind = "limit"
    extra_plugins = [("limit", Plugin())]
    in_flight = 8
'''


def test_layer_suite_catches_a_slot_leaked_on_cancellation(suite: pytest.Pytester) -> None:
    select = "cancel"
    broken = run_suite(suite, LAYER, select, LEAKS=True, LOCKS=False)
    broken.stdout.fnmatch_lines(
        ["*FAILED*test_cancelling_many_requests_in_flight_returns_every_slot*"]
    )
    broken.stdout.fnmatch_lines(["*the layer leaks a slot when a request is cancelled*"])
    # the single-cancellation test alone does not see it: one slot of eight is not missed
    # the old single-cancellation test passes it: one slot of eight leaked is not missed
    broken.assert_outcomes(failed=2, passed=2)
    run_suite(suite, LAYER, select, LEAKS=False, LOCKS=False).assert_outcomes(passed=4)


def test_layer_suite_catches_a_lock_held_across_the_inner_call(suite: pytest.Pytester) -> None:
    select = "overlap"
    broken = run_suite(suite, LAYER, select, LEAKS=False, LOCKS=True)
    broken.assert_outcomes(failed=2)
    broken.stdout.fnmatch_lines(["*lets one through at a time (a lock held across*"])
    run_suite(suite, LAYER, select, LEAKS=False, LOCKS=False).assert_outcomes(passed=2)


# -- discovery -----------------------------------------------------------------------------------

DISCOVERY = '''
import socket
import time

import anyio
import pytest

import meshcore
from meshcore.testing.conformance.discovery import DiscoveryConformance


class Polling:
    def __init__(self, source):
        self.source = source  # a listening socket standing in for a registry

    async def watch(self, sink):
        sink.add_state("polling", lambda: {"polls": self.polls})
        self.polls = 0
        while True:
            if BLOCKS == "sleep":
                time.sleep(0.02)  # blocks the event loop
            elif BLOCKS == "socket":
                socket.create_connection(self.source.getsockname(), timeout=1).close()
            else:
                await anyio.sleep(0.02)
            self.polls += 1
            sink.publish([meshcore.Endpoint("127.0.0.1", 8001), meshcore.Endpoint("127.0.0.1", 8002)])
            await anyio.sleep(0.05)


class TestPolling(DiscoveryConformance):
    @pytest.fixture
    def discovery(self):
        with socket.socket() as source:
            source.bind(("127.0.0.1", 0))
            source.listen(100)
            yield Polling(source)
'''


@pytest.mark.parametrize("blocks", ["sleep", "socket"])
def test_discovery_suite_catches_blocking_io_in_watch(suite: pytest.Pytester, blocks: str) -> None:
    select = "publishes"
    broken = run_suite(suite, DISCOVERY, select, BLOCKS=blocks)
    broken.assert_outcomes(failed=2)
    what = "time.sleep(0.02)" if blocks == "sleep" else "a blocking connect to ('127.0.0.1'"
    broken.stdout.fnmatch_lines([f"*watch must not block*blocking call on the event loop: {what}*test_suite.py:*in watch*"])


def test_discovery_suite_sink_has_add_state_as_the_reference_promises(suite: pytest.Pytester) -> None:
    # The same discovery without the blocking call: it calls `sink.add_state`, which the
    # recording sink lacked, so a discovery written to the hook reference failed the kit.
    run_suite(suite, DISCOVERY, "publishes", BLOCKS=None).assert_outcomes(passed=2)


@pytest.mark.anyio
async def test_the_loop_check_sees_a_stall_that_raises_no_audit_event() -> None:

    check = LoopBlockingCheck(limit=0.2)
    async with check.running():
        await anyio.sleep(0.03)  # the heartbeat has run once
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:  # a busy loop: no call to catch, only the stall
            pass
        await anyio.sleep(0.03)
    assert check.calls == []
    assert any("the event loop was blocked for" in p for p in check.problems()), check.problems()
