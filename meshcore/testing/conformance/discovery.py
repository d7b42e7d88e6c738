"""The contract every Discovery is held to. Subclass `DiscoveryConformance` in your tests.

    from meshcore.testing.conformance.discovery import DiscoveryConformance

    class TestMyDiscovery(DiscoveryConformance):
        @pytest.fixture
        def discovery(self, my_source):          # a Discovery whose source has endpoints
            return MyDiscovery(my_source.address)

        @pytest.fixture
        def broken_discovery(self):              # one whose source fails (optional)
            return MyDiscovery("127.0.0.1:1")

        @pytest.fixture
        def source(self, my_source):             # break/restore/change the source (optional)
            return SourceControl(...)

What is checked, on asyncio and trio (a test needing a fixture you do not define is skipped):

- publishes: `watch` publishes a non-empty set of `meshcore.Endpoint` within `publish_within`
  seconds of starting, and never reports an error for a healthy source.
- survives errors: against a failing source, `watch` reports through `sink.error` (or raises an
  ordinary `Exception`, which the core also survives) within `publish_within`, and never
  publishes an empty set because of the failure (stale beats empty).
- recovers: the source breaks after a first publish; errors are reported, the set is not
  replaced by an empty one; the source comes back changed; the new set is published within
  `follow_within` seconds.
- cancellation is clean: cancelling `watch` (mid-query and while idle) ends it within
  `cancel_within` seconds, with nothing but the cancellation, and it can be watched again.
- no blocking: while `watch` runs (in every test above), no blocking call is made on the event
  loop's thread (`time.sleep`, a blocking socket's connect or send, a name lookup outside the
  async libraries, `urllib`), and the loop never stalls longer than `blocking_limit` seconds.
- the sink is the real one's shape: `publish`, `error` and `add_state(name, provider)`; what a
  provider returns must be JSON-ready.
- with `kind` and `plugins` set, the plugin's factories answer None for kinds not its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest

import meshcore
from meshcore import Endpoint

from .._blocking import LoopBlockingCheck
from .._helpers import static_service
from ._kinds import answers_for_foreign_kinds

__all__ = ["DiscoveryConformance", "RecordingSink", "SourceControl"]


class RecordingSink:
    """A DiscoverySink that records what it was told and lets a test wait for it."""

    def __init__(self, name: str = "svc") -> None:
        self.name = name
        self.published: list[tuple[Endpoint, ...]] = []
        self.errors: list[BaseException] = []
        self.state: dict[str, Callable[[], Any]] = {}
        self._changed = anyio.Event()

    def add_state(self, name: str, provider: Callable[[], Any]) -> None:
        """As `Upstream.add_state`: the discovery's own state, shown in `mesh.state()`."""
        self.state[name] = provider

    def publish(self, endpoints: Any) -> None:
        self.published.append(tuple(endpoints))
        self._wake()

    def error(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    @property
    def last(self) -> tuple[Endpoint, ...] | None:
        return self.published[-1] if self.published else None

    async def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Until `condition()` holds; fails naming `what` after `timeout` seconds."""
        with anyio.move_on_after(timeout):
            while not condition():
                await self._changed.wait()
            return
        pytest.fail(
            f"discovery conformance: {what} did not happen within {timeout:g} s "
            f"(published {len(self.published)} sets, last {self.last!r}; errors {self.errors[-3:]!r})"
        )


class SourceControl:
    """What a subclass's `source` fixture returns: how to break, restore and change its source.

    Each is a plain callable (sync or async). `restore_changed` brings the source back with an
    endpoint set different from before, so the test can see the discovery follow it.
    """

    def __init__(self, break_: Callable[[], Any], restore_changed: Callable[[], Any]) -> None:
        self.break_ = break_
        self.restore_changed = restore_changed


async def _call(fn: Callable[[], Any]) -> None:
    result = fn()
    if hasattr(result, "__await__"):
        await result


class DiscoveryConformance:
    """Inherited tests for one Discovery implementation; see the module docstring."""

    publish_within: float = 5.0
    follow_within: float = 10.0
    cancel_within: float = 1.0
    #: The longest the event loop may stall while `watch` runs (seconds); blocking calls
    #: (`time.sleep`, blocking sockets, name lookups) are reported however short they are.
    blocking_limit: float = 1.0
    #: The plugin list and discovery kind, to check the plugin's factories answer only for
    #: their own kinds (optional: without `kind` that check is skipped, saying so).
    plugins: ClassVar[Sequence[str]] = ()
    extra_plugins: ClassVar[Sequence[tuple[str, Any]]] = ()
    kind: ClassVar[str] = ""

    pytestmark = pytest.mark.anyio

    # -- what a subclass provides --------------------------------------------------------------

    @pytest.fixture
    def discovery(self) -> Any:
        pytest.fail("DiscoveryConformance: define a `discovery` fixture returning your Discovery")

    @pytest.fixture
    def broken_discovery(self) -> Any:
        pytest.skip("no `broken_discovery` fixture: error survival not checked")

    @pytest.fixture
    def source(self) -> SourceControl:
        pytest.skip("no `source` fixture: recovery after an outage not checked")

    # -- the contract -------------------------------------------------------------------------

    async def _run(self, discovery: Any, sink: RecordingSink, body: Callable[[], Any]) -> list[BaseException]:
        """Run `watch` beside `body()`, then cancel it; the Exceptions `watch` raised, if any."""
        raised: list[BaseException] = []

        async def watcher() -> None:
            try:
                await discovery.watch(sink)
            except Exception as exc:  # noqa: BLE001 - recorded, judged by the caller
                raised.append(exc)
                sink.error(exc)
                return
            await anyio.sleep_forever()  # a static source may return after publishing

        check = LoopBlockingCheck(self.blocking_limit)
        self._check = check
        async with check.running(), anyio.create_task_group() as tg:
            tg.start_soon(watcher)
            await body()
            tg.cancel_scope.cancel()
        problems = check.problems()
        assert not problems, "watch must not block (use anyio's sockets, sleeps, to_thread): " + "; ".join(problems)
        return raised

    async def _source(self, control: Callable[[], Any]) -> None:
        """Run a `SourceControl` step; the test's own setup is not judged for blocking."""
        with self._check.pause():
            await _call(control)

    async def test_publishes_within_bound(self, discovery: Any) -> None:
        sink = RecordingSink()

        async def body() -> None:
            await sink.wait_for(lambda: bool(sink.published), self.publish_within, "a first publish")

        raised = await self._run(discovery, sink, body)
        assert not raised, f"watch raised against a healthy source: {raised!r}"
        first = sink.published[0]
        assert first, "the first published set is empty although the source has endpoints"
        assert all(isinstance(ep, Endpoint) for ep in first), f"not Endpoints: {first!r}"
        assert len(set(first)) == len(first), f"duplicate endpoints: {first!r}"
        assert not sink.errors, f"errors reported for a healthy source: {sink.errors!r}"
        for provider in sink.state.values():
            json.dumps(provider())  # what add_state shows must be JSON-ready (mesh.state())

    async def test_factory_answers_only_for_its_own_kinds(self) -> None:
        if not self.kind:
            pytest.skip("set `kind` and `plugins` on the subclass to check the plugin's factories")
        config = {"services": {"svc": static_service(["127.0.0.1:9"])}}
        mesh = meshcore.Mesh(config, list(self.plugins), extra_plugins=list(self.extra_plugins))
        async with mesh:
            assert mesh.plugins.kinds[self.kind].family == "discovery"
            wrong = answers_for_foreign_kinds(mesh, self.kind)
        assert not wrong, "\n".join(wrong)

    async def test_survives_errors(self, broken_discovery: Any) -> None:
        sink = RecordingSink()

        async def body() -> None:
            await sink.wait_for(lambda: bool(sink.errors), self.publish_within, "an error report")

        await self._run(broken_discovery, sink, body)
        assert all(isinstance(e, Exception) for e in sink.errors), sink.errors
        assert not any(not p for p in sink.published), "published an empty set on failure"

    async def test_recovers_after_outage(self, discovery: Any, source: SourceControl) -> None:
        sink = RecordingSink()

        async def body() -> None:
            await sink.wait_for(lambda: bool(sink.published), self.publish_within, "a first publish")
            before, published = sink.published[-1], len(sink.published)
            errors = len(sink.errors)
            await self._source(source.break_)
            await sink.wait_for(
                lambda: len(sink.errors) > errors, self.follow_within, "an error after the outage"
            )
            assert all(p for p in sink.published[published:]), "published an empty set in the outage"
            await self._source(source.restore_changed)
            await sink.wait_for(
                lambda: sink.last is not None and set(sink.last) != set(before),
                self.follow_within,
                "the changed set after the source came back",
            )

        await self._run(discovery, sink, body)

    @pytest.mark.parametrize("when", ["immediately", "after-publish"])
    async def test_cancellation_is_clean(self, discovery: Any, when: str) -> None:
        sink = RecordingSink()
        for _round in range(2):  # cancelled once, the same object can be watched again
            with anyio.fail_after(self.publish_within + self.cancel_within):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(discovery.watch, sink)
                    if when == "after-publish":
                        count = len(sink.published)

                        def published_again(count: int = count) -> bool:
                            return len(sink.published) > count

                        await sink.wait_for(published_again, self.publish_within, "a publish")
                    else:
                        await anyio.lowlevel.checkpoint()
                    cancelled_at = anyio.current_time()
                    tg.cancel_scope.cancel()
                elapsed = anyio.current_time() - cancelled_at
            assert elapsed <= self.cancel_within, f"watch took {elapsed:.3f} s to end on cancel"
