"""Discovery kind `etcd`: one range read, then one watch over the whole prefix, per mesh.

Every service discovered from the same cluster and prefix shares one `PrefixWatch`: one range
of `<prefix>`, then one `/v3/watch` stream over it, whose events are sorted into per-service
instance tables. A service's `EtcdDiscovery.watch` only subscribes and publishes its own
table when it changes. So 1,000 services cost one watch connection and one for unary calls
(the consul plugin's blocking query per service took a sidecar with 1,000 services to 1,001
registry connections, 19.7 s to become ready and 772 MiB: issue 19). The shared loop runs in
one subscriber's task; when that subscriber leaves, another takes it over and resumes from the
kept revision, so the watch never depends on one service staying configured.

The loop follows etcd's own client (etcd-io/etcd client/v3/watch.go) and what a real 3-member
cluster did on loopback (shared/reference/etcd.md, sections 3 and 4):

- range the prefix (linearizable) -> publish -> watch from `header.revision + 1`;
- after events the next revision is the last event's `mod_revision + 1`; after an event-less
  progress response it is `header.revision + 1`; never `header.revision` after events (a
  partial batch carries the store's current revision);
- on any break (member killed, no leader, probe failure, bad answer) move to the next member
  and resume from that revision: resume is lossless, and a re-list would cost every watcher a
  full read (re-list storms: kubernetes/kubernetes#6770);
- `canceled` with `compact_revision` means the revision is gone: range the prefix again;
- the watch carries `hasleader` (gRPC metadata through the gateway's `Grpc-Metadata-` header,
  Go's `WithRequireLeader`), so a member cut off from its quorum cancels it (after ~4 s)
  instead of leaving it silent;
- the gateway has no keepalive and a frozen member (SIGSTOP, a partition keeping TCP open)
  leaves a watch silent for as long as it lasts (etcd-io/etcd#7838), so the member is probed
  with `/v3/maintenance/status` every `probe_interval` (etcdctl pings every 2 s) and dropped
  when it does not answer within `probe_timeout` or reports no leader;
- while every member fails, back off with full jitter (250 ms doubling to 60 s, as the
  consul plugin); the last good endpoints stay published (stale beats empty), each failure
  is reported to every subscribed service and counted.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

import meshcore

from ._client import (
    Cluster,
    ClusterConfig,
    EtcdAnswerError,
    b64,
    describe,
    error_of,
    int64,
    parse_json,
    prefix_end,
    unb64,
)
from ._keys import Instance, parse_instance, split_key

__all__ = ["EtcdDiscovery", "PrefixWatch", "WatchOptions", "next_revision"]

# The most errors a subscriber keeps for its sink between two wake-ups.
_PENDING_ERRORS = 16


class Compacted(Exception):
    """The watch's start revision was compacted away; the prefix must be read again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch start revision compacted (compact_revision {compact_revision}); reloading")
        self.compact_revision = compact_revision


class MemberSilent(Exception):
    """The watched member did not pass its status probe: frozen, partitioned or leaderless."""


def next_revision(current: int, result: Mapping[str, Any]) -> int:
    """The revision to resume a watch from after `result` (one WatchResponse), by etcd's own
    client's rule (client/v3/watch.go serveSubstream)."""
    events = result.get("events") or ()
    if events:
        last = events[-1].get("kv") or {}
        return int64(last.get("mod_revision"), "events[-1].kv.mod_revision") + 1
    if result.get("created"):
        return current
    header = result.get("header") or {}
    revision = int64(header.get("revision"), "header.revision", 0)
    return max(current, revision + 1) if revision else current


@dataclass(frozen=True)
class WatchOptions:
    """How the shared watch behaves; services whose options are equal share it."""

    cluster: ClusterConfig
    prefix: str = "meshcore/services/"
    require_leader: bool = True
    probe_interval: float = 2.0
    probe_timeout: float = 2.0
    backoff: float = 0.25
    max_backoff: float = 60.0


class _Subscriber:
    __slots__ = ("dirty", "errors", "event", "service")

    def __init__(self, service: str) -> None:
        self.service = service
        self.dirty = False
        self.errors: list[BaseException] = []
        self.event = anyio.Event()

    def wake(self) -> None:
        self.event.set()


class PrefixWatch:
    """The instances of every service under one prefix, kept current by one watch.

    Get one with `PrefixWatch.acquire(options)` inside a task (equal options share one) and
    hand it back with `release()`. `serve()` is run by every subscriber; only one of them
    runs the loop at a time.
    """

    # Keyed by thread too: anyio's events belong to one event loop, one per thread.
    _shared: dict[tuple[WatchOptions, int, int], PrefixWatch] = {}

    def __init__(self, options: WatchOptions) -> None:
        self.options = options
        self.prefix = options.prefix.encode()
        self.services: dict[str, dict[bytes, Instance]] = {}
        self.revision = 0  # the next revision to watch from; 0: read the prefix first
        self.loaded = False
        self.member = 0
        self.users = 0
        self.subscribers: dict[str, list[_Subscriber]] = {}
        # counters shown in state
        self.loads = 0
        self.reloads = 0  # loads after a compaction
        self.resumes = 0  # watches started again from a kept revision
        self.watches = 0
        self.failovers = 0
        self.errors = 0
        self.bad_values = 0
        self.last_error: str | None = None
        self.last_bad_value: str | None = None
        self.watching: str | None = None
        self._running = False
        self._runner_left = anyio.Event()
        self._made_progress = False  # the current member accepted the watch

    # -- sharing ----------------------------------------------------------------------------

    @staticmethod
    def _key(options: WatchOptions) -> tuple[WatchOptions, int, int]:
        return (options, id(options.cluster.transport), threading.get_ident())

    @classmethod
    def running(cls, options: WatchOptions) -> PrefixWatch | None:
        """The shared watch of `options` in this thread, if a service is subscribed to it."""
        return cls._shared.get(cls._key(options))

    @classmethod
    def acquire(cls, options: WatchOptions) -> PrefixWatch:
        key = cls._key(options)
        shared = cls._shared.get(key)
        if shared is None:
            shared = cls._shared[key] = cls(options)
        shared.users += 1
        return shared

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            key = self._key(self.options)
            if self._shared.get(key) is self:
                del self._shared[key]

    def subscribe(self, service: str) -> _Subscriber:
        sub = _Subscriber(service)
        if self.loaded:  # joining a running watch (a reload, another mesh): answer at once
            sub.dirty = True
            sub.wake()
        self.subscribers.setdefault(service, []).append(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        subs = self.subscribers.get(sub.service, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self.subscribers.pop(sub.service, None)

    # -- what subscribers read --------------------------------------------------------------

    def endpoints(self, service: str, include_warning: bool = False) -> list[meshcore.Endpoint]:
        table = self.services.get(service, {})
        allowed = ("passing", "warning") if include_warning else ("passing",)
        return [inst.endpoint for _key, inst in sorted(table.items()) if inst.health in allowed]

    def state(self) -> dict[str, Any]:
        """JSON-ready: the shared watch's member, revision and counters."""
        return {
            "prefix": self.options.prefix,
            "member": self.watching,
            "revision": self.revision - 1 if self.revision else None,
            "services": len(self.services),
            "instances": sum(len(t) for t in self.services.values()),
            "subscribed_services": len(self.subscribers),
            "loads": self.loads, "reloads": self.reloads, "resumes": self.resumes,
            "failovers": self.failovers, "errors": self.errors, "last_error": self.last_error,
            "bad_values": self.bad_values, "last_bad_value": self.last_bad_value,
        }

    def _notify(self, services: Iterable[str]) -> None:
        for service in services:
            for sub in self.subscribers.get(service, ()):
                sub.dirty = True
                sub.wake()

    def _report(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = describe(exc)
        for subs in self.subscribers.values():
            for sub in subs:
                if len(sub.errors) < _PENDING_ERRORS:
                    sub.errors.append(exc)
                sub.wake()

    def _bad_value(self, exc: Exception) -> None:
        self.bad_values += 1
        self.last_bad_value = str(exc)

    # -- applying what etcd said --------------------------------------------------------------

    def _parse(self, key: bytes, value: bytes) -> tuple[str, Instance] | None:
        parts = split_key(key, self.prefix)
        if parts is None:
            return None
        try:
            return parts[0], parse_instance(value, key.decode(errors="replace"))
        except EtcdAnswerError as exc:
            self._bad_value(exc)
            return None

    def _load(self, data: Mapping[str, Any]) -> None:
        header = data.get("header")
        if not isinstance(header, Mapping):
            raise EtcdAnswerError("kv/range: answer has no header")
        revision = int64(header.get("revision"), "kv/range header.revision")
        kvs = data.get("kvs") or []
        if not isinstance(kvs, list):
            raise EtcdAnswerError(f"kv/range kvs: expected a list, got {type(kvs).__name__}")
        services: dict[str, dict[bytes, Instance]] = {}
        for i, kv in enumerate(kvs):
            if not isinstance(kv, Mapping):
                raise EtcdAnswerError(f"kv/range kvs[{i}]: expected an object")
            key = unb64(kv.get("key"), f"kv/range kvs[{i}].key")
            parsed = self._parse(key, unb64(kv.get("value", ""), f"kv/range kvs[{i}].value"))
            if parsed is not None:
                services.setdefault(parsed[0], {})[key] = parsed[1]
        changed = {s for s in services.keys() | self.services.keys()
                   if services.get(s) != self.services.get(s)}
        first = not self.loaded
        self.services = services
        self.revision = revision + 1
        self.loaded = True
        self.loads += 1
        # A first load answers every subscriber, even those whose service has no instance yet.
        self._notify(self.subscribers if first else changed)

    def _apply(self, result: Mapping[str, Any]) -> None:
        """One WatchResponse: apply its events, advance the revision, notify once."""
        events = result.get("events") or []
        if not isinstance(events, list):
            raise EtcdAnswerError(f"watch events: expected a list, got {type(events).__name__}")
        changed: set[str] = set()
        for i, event in enumerate(events):
            kv = event.get("kv") if isinstance(event, Mapping) else None
            if not isinstance(kv, Mapping):
                raise EtcdAnswerError(f"watch events[{i}]: expected an object with kv")
            int64(kv.get("mod_revision"), f"watch events[{i}].kv.mod_revision")
            key = unb64(kv.get("key"), f"watch events[{i}].kv.key")
            kind = event.get("type", "PUT")
            if kind not in ("PUT", "DELETE"):
                raise EtcdAnswerError(f"watch events[{i}].type: expected PUT or DELETE, got {kind!r:.30}")
            parts = split_key(key, self.prefix)
            if parts is None:
                continue
            service = parts[0]
            table = self.services.setdefault(service, {})
            if kind == "DELETE":
                if table.pop(key, None) is not None:
                    changed.add(service)
            else:
                parsed = self._parse(key, unb64(kv.get("value", ""), f"watch events[{i}].kv.value"))
                # A key rewritten into something unreadable no longer describes an instance.
                if parsed is None:
                    if table.pop(key, None) is not None:
                        changed.add(service)
                elif table.get(key) != parsed[1]:
                    table[key] = parsed[1]
                    changed.add(service)
            if not table:
                del self.services[service]
        self.revision = next_revision(self.revision, result)
        if changed:
            self._notify(changed)

    # -- the loop ------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the shared loop if nobody does, else wait to take over. Never returns."""
        while True:
            if self._running:
                await self._runner_left.wait()
                continue
            self._running = True
            try:
                await self._run()
            finally:
                self._running = False
                left, self._runner_left = self._runner_left, anyio.Event()
                left.set()

    async def _run(self) -> None:
        options = self.options
        backoff = options.backoff
        failures = 0
        async with Cluster(options.cluster) as cluster:
            cluster.member = self.member % len(cluster.members)
            while True:
                member = cluster.current
                self._made_progress = False
                try:
                    if not self.revision:
                        await self._range(cluster, member)
                        failures, backoff = 0, options.backoff
                    await self._watch_member(cluster, member)
                except Compacted:
                    # etcd telling us to read again, not a failure: no error, no backoff
                    self.reloads += 1
                    self.revision = 0
                    continue
                except Exception as exc:  # noqa: BLE001 - every failure is survived and counted
                    self._report(exc)
                    self.member = cluster.member = (cluster.member + 1) % len(cluster.members)
                    self.failovers += 1
                    failures += 1
                    if self._made_progress:
                        failures, backoff = 1, options.backoff
                    if failures >= len(cluster.members):
                        # Every member failed in a row: full jitter, so a fleet of watchers
                        # does not hammer a recovering cluster in step; then a new round.
                        await anyio.sleep(backoff * random.random())
                        backoff = min(backoff * 2, options.max_backoff)
                        failures = 0

    async def _range(self, cluster: Cluster, member: str) -> None:
        body = {"key": b64(self.prefix), "range_end": b64(prefix_end(self.prefix))}
        self._load(await cluster.call(member, "/v3/kv/range", body))

    async def _watch_member(self, cluster: Cluster, member: str) -> None:
        """Watch from `self.revision` on `member`, probing it beside; returns only by raising."""
        failure: list[Exception] = []
        async with anyio.create_task_group() as tg:

            async def probe() -> None:
                try:
                    while True:
                        await anyio.sleep(self.options.probe_interval)
                        await self._probe(cluster, member)
                except Exception as exc:  # noqa: BLE001 - reported by the caller
                    failure.append(exc)
                    tg.cancel_scope.cancel()

            tg.start_soon(probe)
            try:
                await self._stream(cluster, member)
                failure.append(EtcdAnswerError(f"{member}: watch stream ended"))
            except Exception as exc:  # noqa: BLE001 - reported by the caller
                failure.append(exc)
            tg.cancel_scope.cancel()
        raise failure[0]

    async def _probe(self, cluster: Cluster, member: str) -> None:
        timeout = self.options.probe_timeout
        try:
            with anyio.fail_after(timeout):
                data = await cluster.call(member, "/v3/maintenance/status", {}, timeout=timeout)
        except TimeoutError:
            raise MemberSilent(f"{member}: no status answer within {timeout:g} s") from None
        except (httpx.HTTPError, OSError, EtcdAnswerError) as exc:
            raise MemberSilent(f"{member}: status probe failed: {describe(exc)}") from None
        if self.options.require_leader and str(data.get("leader", "0")) in ("0", ""):
            raise MemberSilent(f"{member}: reports no leader")

    async def _stream(self, cluster: Cluster, member: str) -> None:
        start = self.revision
        request = {"create_request": {
            "key": b64(self.prefix), "range_end": b64(prefix_end(self.prefix)),
            "start_revision": str(start), "progress_notify": True,
        }}
        headers = {"Grpc-Metadata-hasleader": "true"} if self.options.require_leader else {}
        limit = self.options.cluster.max_answer_size
        async with cluster.stream(member, "/v3/watch", request, headers) as response:
            buffer = b""
            async for chunk in response.aiter_bytes():
                buffer += chunk
                while True:
                    line, sep, rest = buffer.partition(b"\n")
                    if not sep:
                        break
                    buffer = rest
                    if line.strip():
                        self._message(member, line)
                if len(buffer) > limit:
                    raise EtcdAnswerError(f"{member}: watch message exceeds the limit of {limit} bytes")
            if buffer.strip():
                self._message(member, buffer)

    def _message(self, member: str, line: bytes) -> None:
        data = parse_json(line, f"{member}/v3/watch")
        if not isinstance(data, Mapping):
            raise EtcdAnswerError(f"{member}/v3/watch: expected a JSON object, got {type(data).__name__}")
        if "error" in data:
            raise error_of(member, 200, data)
        result = data.get("result")
        if not isinstance(result, Mapping):
            raise EtcdAnswerError(f"{member}/v3/watch: expected {{\"result\": ...}}, got {line[:60]!r}")
        if result.get("canceled"):
            compact = int64(result.get("compact_revision"), "watch compact_revision", 0)
            if compact > 0:
                raise Compacted(compact)
            reason = str(result.get("cancel_reason", ""))[:200]
            raise EtcdAnswerError(f"{member}: watch canceled" + (f": {reason}" if reason else ""))
        if result.get("created"):
            if self.watches and self.loaded:
                self.resumes += 1
            self.watches += 1
            self.watching = member
            self._made_progress = True
            return
        self._apply(result)


class EtcdDiscovery:
    """One service's endpoints from the shared watch of its cluster and prefix."""

    def __init__(self, options: WatchOptions, service: str, *, include_warning: bool = False) -> None:
        self.options = options
        self.service = service
        self.include_warning = include_warning

    async def watch(self, sink: meshcore.DiscoverySink) -> None:
        shared = PrefixWatch.acquire(self.options)
        sub = shared.subscribe(self.service)
        add_state = getattr(sink, "add_state", None)
        if add_state is not None:
            add_state("etcd", shared.state)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(shared.serve)
                while True:
                    await sub.event.wait()
                    sub.event = anyio.Event()
                    errors, sub.errors = sub.errors, []
                    for exc in errors:
                        sink.error(exc)
                    if sub.dirty:
                        sub.dirty = False
                        sink.publish(shared.endpoints(self.service, self.include_warning))
        finally:
            shared.unsubscribe(sub)
            shared.release()

    async def resolve_once(self) -> list[meshcore.Endpoint]:
        """The service's endpoints now, from one range read (for `check-config --resolve`)."""
        prefix = (self.options.prefix + self.service + "/").encode()
        body = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
        async with Cluster(self.options.cluster) as cluster:
            data = await cluster.request("/v3/kv/range", body)
        shared = PrefixWatch(self.options)
        shared._load(data)
        if shared.bad_values:
            raise EtcdAnswerError(f"{shared.bad_values} unreadable value(s): {shared.last_bad_value}")
        return shared.endpoints(self.service, self.include_warning)
