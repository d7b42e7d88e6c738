"""Discovery kind `etcd` against a real 3-member cluster: the first read and the watch, the
shared watch over the prefix, failover when the watched member is killed or frozen, reload
after compaction, unreadable values skipped and counted."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from etcd_testkit import Admin, EtcdCluster
from meshcore_etcd import ClusterConfig, EtcdDiscovery, PrefixWatch, WatchOptions

from meshcore.testing.conformance.discovery import RecordingSink

pytestmark = pytest.mark.anyio

PROBE = 0.3  # probe interval and timeout in these tests: a frozen member is left within 0.6 s


def options(etcd: EtcdCluster, admin: Admin, **kw: Any) -> WatchOptions:
    cluster = ClusterConfig(endpoints=tuple(etcd.urls), timeout=kw.pop("timeout", 0.5))
    return WatchOptions(cluster, prefix=admin.prefix, probe_interval=PROBE, probe_timeout=PROBE,
                        backoff=0.02, max_backoff=0.2, **kw)


def ports(sink: RecordingSink) -> set[int]:
    return {ep.port for ep in sink.last or ()}


@asynccontextmanager
async def watching(discovery: EtcdDiscovery, sink: RecordingSink) -> AsyncIterator[PrefixWatch]:
    """Run `discovery.watch(sink)` beside the body; yields the shared watch once it published."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(discovery.watch, sink)
        await sink.wait_for(lambda: bool(sink.published), 5, "a first publish")
        yield await watch_of(discovery.options)
        tg.cancel_scope.cancel()


async def watch_of(opts: WatchOptions) -> PrefixWatch:
    """The shared watch of `opts`, once its watch stream is open."""
    shared = PrefixWatch.running(opts)
    assert shared is not None
    await until(lambda: shared.watching is not None, 5, "the watch")
    return shared


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def test_reads_then_follows_puts_and_deletes(etcd, admin):
    await admin.put_instance("orders", 7001)
    await admin.put_instance("orders", 7002, weight=3, zone="a", tags=["v2"], meta={"version": "1.4"})
    await admin.put_instance("orders", 7003, health="warning")
    await admin.put_instance("billing", 7100)
    sink = RecordingSink()
    async with watching(EtcdDiscovery(options(etcd, admin), "orders"), sink) as shared:
        assert ports(sink) == {7001, 7002}  # the warning instance is hidden by default
        second = next(ep for ep in sink.last if ep.port == 7002)
        assert (second.weight, second.zone, second.tags, second.meta) == (3, "a", ("v2",), {"version": "1.4"})
        await admin.put_instance("orders", 7004)
        await sink.wait_for(lambda: ports(sink) == {7001, 7002, 7004}, 2, "a put")
        await admin.delete(admin.key("orders", "i7001"))
        await sink.wait_for(lambda: ports(sink) == {7002, 7004}, 2, "a delete")
        published = len(sink.published)
        await admin.put_instance("billing", 7101)  # another service: no publish for orders
        await admin.put_instance("orders", 7005)
        await sink.wait_for(lambda: 7005 in ports(sink), 2, "the next put")
        assert len(sink.published) == published + 1
        assert (shared.loads, shared.errors, shared.bad_values) == (1, 0, 0)
        assert shared.state()["services"] == 2 and shared.state()["instances"] == 6
    assert not sink.errors
    assert PrefixWatch._shared == {}  # handed back when the last subscriber left


async def test_include_warning_and_grpc_go_values(etcd, admin):
    await admin.put_instance("orders", 7003, health="warning")
    # gRPC-Go's endpoint manager (3.4 wrote Op) and opaque metadata of other writers
    await admin.put(admin.key("orders", "go-1"), {"Op": 0, "Addr": "127.0.0.1:7010", "Metadata": None})
    await admin.put(admin.key("orders", "go-2"), {"Addr": "127.0.0.1:7011", "Metadata": {"weight": "heavy"}})
    sink = RecordingSink()
    async with watching(EtcdDiscovery(options(etcd, admin), "orders", include_warning=True), sink) as shared:
        assert ports(sink) == {7003, 7010, 7011}
        assert shared.bad_values == 0


async def test_empty_service_publishes_empty_and_later_fills(etcd, admin):
    sink = RecordingSink()
    async with watching(EtcdDiscovery(options(etcd, admin), "orders"), sink):
        assert sink.published == [()]  # etcd says there is none: that is an answer
        await admin.put_instance("orders", 7001)
        await sink.wait_for(lambda: ports(sink) == {7001}, 2, "the first instance")


async def test_unreadable_values_are_skipped_and_counted(etcd, admin):
    await admin.put_instance("orders", 7001)
    await admin.put(admin.key("orders", "garbage"), b"\xff not json")
    await admin.put(admin.key("orders", "no-addr"), {"Address": "x"})
    await admin.put(admin.key("orders", "bad-port"), {"Addr": "127.0.0.1:99999"})
    await admin.put(admin.key("orders", "bad-meta"), {"Addr": "127.0.0.1:7009", "Metadata": {"meshcore": 1, "weight": -1}})
    await admin.put(admin.prefix + "orders", {"Addr": "127.0.0.1:7008"})  # no instance id
    sink = RecordingSink()
    async with watching(EtcdDiscovery(options(etcd, admin), "orders"), sink) as shared:
        assert ports(sink) == {7001}
        assert shared.bad_values == 4
        # an instance rewritten into garbage is no longer an instance
        await admin.put(admin.key("orders", "i7001"), "[]")
        await sink.wait_for(lambda: ports(sink) == set(), 2, "the unreadable rewrite")
        assert shared.bad_values == 5
    assert not sink.errors


async def test_one_watch_serves_every_service_and_survives_its_runner_leaving(etcd, admin):
    services = [f"s{i}" for i in range(40)]
    for i, name in enumerate(services):
        await admin.put_instance(name, 8000 + i)
    opts = options(etcd, admin)
    sinks = {name: RecordingSink() for name in services}
    async with anyio.create_task_group() as tg:
        scopes: dict[str, anyio.CancelScope] = {}

        async def run(name: str) -> None:
            with anyio.CancelScope() as scope:
                scopes[name] = scope
                await EtcdDiscovery(opts, name).watch(sinks[name])

        for name in services:
            tg.start_soon(run, name)
        for i, name in enumerate(services):
            await sinks[name].wait_for(lambda s=sinks[name], i=i: ports(s) == {8000 + i}, 5, f"{name}'s first publish")
        shared = await watch_of(opts)
        assert (shared.loads, shared.watches, shared.users) == (1, 1, 40)
        # Whoever runs the shared loop leaves: another subscriber resumes from the kept
        # revision, without reading the prefix again.
        for name in services[:20]:
            scopes[name].cancel()
        await until(lambda: shared.users == 20, 2, "20 subscribers leaving")
        await admin.put_instance("s39", 8100)
        await sinks["s39"].wait_for(lambda: 8100 in ports(sinks["s39"]), 3, "a put after the handover")
        assert shared.loads == 1
        tg.cancel_scope.cancel()
    assert all(not s.errors for s in sinks.values())


async def burst(admin: Admin, services: list[str], count: int, seed: int) -> None:
    """`count` puts and deletes at random over `services`, one every ~10 ms."""
    rng = random.Random(seed)
    for _ in range(count):
        service, port = rng.choice(services), rng.randrange(9000, 9030)
        if rng.random() < 0.3:
            await admin.delete(admin.key(service, f"i{port}"))
        else:
            await admin.put_instance(service, port, weight=rng.randrange(1, 5))
        await anyio.sleep(0.01)


async def expected(admin: Admin, service: str) -> set[tuple[int, int]]:
    out = set()
    for key, value in (await admin.contents()).items():
        if key.startswith(f"{admin.prefix}{service}/"):
            data = json.loads(value)
            out.add((int(data["Addr"].rsplit(":", 1)[1]), data.get("Metadata", {}).get("weight", 1)))
    return out


def seen(sink: RecordingSink) -> set[tuple[int, int]]:
    return {(ep.port, ep.weight) for ep in sink.last or ()}


async def test_watched_member_killed_resumes_elsewhere_without_loss(etcd, admin):
    services = ["a", "b", "c"]
    sinks = {s: RecordingSink() for s in services}
    opts = options(etcd, admin)
    async with anyio.create_task_group() as tg:
        for s in services:
            tg.start_soon(EtcdDiscovery(opts, s).watch, sinks[s])
        for s in services:
            await sinks[s].wait_for(lambda s=s: bool(sinks[s].published), 5, "a first publish")
        shared = await watch_of(opts)
        watched = etcd.urls.index(shared.watching)

        async def kill_midway() -> None:
            await anyio.sleep(0.3)
            etcd.kill(watched)

        tg.start_soon(kill_midway)
        await burst(admin, services, 80, seed=1)
        for s in services:
            want = await expected(admin, s)
            await sinks[s].wait_for(lambda s=s, want=want: seen(sinks[s]) == want, 5, f"{s} matching etcd")
        assert shared.watching != etcd.urls[watched]
        assert shared.loads == 1 and shared.resumes >= 1  # resumed from its revision, no re-list
        assert shared.errors >= 1 and any(sinks[s].errors for s in services)
        tg.cancel_scope.cancel()


async def test_frozen_member_is_left_within_the_probe_interval(etcd, admin):
    await admin.put_instance("orders", 7001)
    sink = RecordingSink()
    async with watching(EtcdDiscovery(options(etcd, admin), "orders"), sink) as shared:
        watched = etcd.urls.index(shared.watching)
        etcd.freeze(watched)
        frozen_at = anyio.current_time()
        # Without the probe the watch stays silent while the member is frozen (etcd-io/etcd#7838).
        await until(lambda: shared.watching != etcd.urls[watched], 2 * PROBE + 1.5, "the watch moving")
        moved = anyio.current_time() - frozen_at
        assert moved <= 2 * PROBE + 1.0, moved  # probe interval + timeout, + a slow answer elsewhere
        await admin.put_instance("orders", 7002)
        await sink.wait_for(lambda: ports(sink) == {7001, 7002}, 3, "a put while one member is frozen")
        assert "no status answer" in shared.state()["last_error"] or shared.errors >= 1
        assert shared.loads == 1


async def test_compaction_past_the_revision_reloads_the_prefix(etcd, admin):
    await admin.put_instance("orders", 7001)
    await admin.put_instance("orders", 7002)
    opts = options(etcd, admin)
    shared = PrefixWatch.acquire(opts)
    try:
        sub = shared.subscribe("orders")
        async with anyio.create_task_group() as tg:  # watch, then go away (a long outage)
            tg.start_soon(shared.serve)
            await until(lambda: shared.watches == 1, 5, "the watch")
            tg.cancel_scope.cancel()
        assert {ep.port for ep in shared.endpoints("orders")} == {7001, 7002}
        for port in range(7010, 7030):
            await admin.put_instance("orders", port)
        await admin.delete(admin.key("orders", "i7001"))
        revision = await admin.delete(admin.key("orders", "i7010"))
        await admin.compact(revision)
        async with anyio.create_task_group() as tg:
            tg.start_soon(shared.serve)
            # etcd accepts the watch (`created`), then cancels it with `compact_revision`
            await until(lambda: shared.reloads == 1 and shared.watches == 3, 5, "the watch after the reload")
            tg.cancel_scope.cancel()
        assert shared.reloads == 1 and shared.loads == 2
        assert {ep.port for ep in shared.endpoints("orders")} == await admin.ports("orders")
        assert sub.dirty
    finally:
        shared.release()


async def test_unreachable_cluster_reports_errors_and_publishes_nothing():
    from meshcore.testing import free_port

    opts = WatchOptions(ClusterConfig(endpoints=(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"),
                                      timeout=0.2), prefix="nowhere/", backoff=0.01, max_backoff=0.05)
    sink = RecordingSink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(EtcdDiscovery(opts, "orders").watch, sink)
        await sink.wait_for(lambda: len(sink.errors) >= 4, 5, "errors from both members")
        tg.cancel_scope.cancel()
    assert sink.published == []  # never an empty set because of a failure
    assert isinstance(sink.errors[0], httpx.ConnectError)
    assert PrefixWatch._shared == {}


async def test_isolated_member_is_left_snapshot_kept_and_recovered_after_the_heal(etcd, admin):
    await admin.put_instance("orders", 7001)
    sink = RecordingSink()
    async with watching(EtcdDiscovery(options(etcd, admin), "orders"), sink) as shared:
        watched = etcd.urls.index(shared.watching)
        others = [i for i in range(3) if i != watched]
        for i in others:  # the watched member is left alone: no quorum, soon no leader
            etcd.freeze(i)
        errors = len(sink.errors)
        await sink.wait_for(lambda: len(sink.errors) > errors + 2, 5, "errors while no member has a leader")
        assert any("no leader" in str(e) or "no status answer" in str(e) for e in sink.errors[errors:])
        assert all(sink.published)  # stale beats empty: nothing published meanwhile
        assert ports(sink) == {7001}
        for i in others:
            etcd.thaw(i)
        await admin.put_instance("orders", 7002)
        await sink.wait_for(lambda: ports(sink) == {7001, 7002}, 10, "the put after the heal")
        assert shared.loads == 1


async def test_a_service_joining_a_running_watch_is_answered_at_once(etcd, admin):
    await admin.put_instance("orders", 7001)
    await admin.put_instance("billing", 7100)
    opts = options(etcd, admin)
    first, late = RecordingSink(), RecordingSink()
    async with watching(EtcdDiscovery(opts, "orders"), first) as shared:
        async with anyio.create_task_group() as tg:
            tg.start_soon(EtcdDiscovery(opts, "billing").watch, late)
            await late.wait_for(lambda: ports(late) == {7100}, 1, "the late subscriber's snapshot")
            tg.cancel_scope.cancel()
        assert shared.loads == 1 and shared.watches == 1  # served from the running watch


async def test_grpc_go_format_written_by_etcdctl_is_discovered(etcd, admin):
    from meshcore.testing import require_binary

    etcdctl = require_binary("etcdctl")
    sink = RecordingSink()
    async with watching(EtcdDiscovery(options(etcd, admin), "orders"), sink):
        # what gRPC-Go's endpoints.Manager.AddEndpoint writes, through etcd's own gRPC client
        value = json.dumps({"Op": 0, "Addr": "127.0.0.1:7020", "Metadata": None})
        cmd = [etcdctl, "--endpoints", ",".join(etcd.urls), "put", admin.key("orders", "127.0.0.1:7020"), value]
        result = await anyio.run_process(cmd, env={"ETCDCTL_API": "3"})
        assert result.returncode == 0
        await sink.wait_for(lambda: ports(sink) == {7020}, 3, "the etcdctl put")


async def test_hasleader_makes_an_isolated_member_cancel_the_watch(etcd, admin):
    # The probe is kept out of the way (100 s), so what ends the watch is etcd itself: the
    # gateway passes `Grpc-Metadata-hasleader: true` on as gRPC metadata, and a member that
    # lost its leader cancels such watches ("etcdserver: no leader"); without it the watch
    # would stay silent (shared/reference/etcd.md, 3.4).
    sink = RecordingSink()
    opts = options(etcd, admin)
    opts = WatchOptions(opts.cluster, prefix=opts.prefix, probe_interval=100, probe_timeout=1,
                        backoff=0.02, max_backoff=0.2)
    async with watching(EtcdDiscovery(opts, "orders"), sink) as shared:
        watched = etcd.urls.index(shared.watching)
        for i in range(3):
            if i != watched:
                etcd.freeze(i)
        await sink.wait_for(lambda: any("no leader" in str(e) for e in sink.errors), 8, "the watch canceled by etcd")
        first = next(e for e in sink.errors if "no leader" in str(e))
        assert etcd.urls[watched] in str(first)
