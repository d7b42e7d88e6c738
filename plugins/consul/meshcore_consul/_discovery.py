"""Discovery kind `consul`: push through Consul blocking queries on /v1/health/service/<name>.

The loop follows Consul's client rules for blocking queries (api-docs/features/blocking.mdx):

- send `?index=<last X-Consul-Index>&wait=<wait>`; the agent answers when the service's index
  moves past it or when `wait` (plus up to wait/16 jitter) runs out;
- if the index goes backwards (registry restarted without its data, raft snapshot restore),
  reset it to 0 so the next query returns at once instead of blocking on a future index;
- after an error, start over with a non-blocking query (the agent may have come back at a
  lower index, which a blocking query would only reveal after `wait`);
- never keep an index below 1 (an index of 0 would turn every query non-blocking);
- rate-limit the loop with a token bucket of burst 2 rather than sleeping every iteration, so
  a churning registry costs a bounded number of requests while a lone change is seen at once.

One malformed entry (`Port: 0`, an `Address` that is not a host name or IP literal) is skipped
and counted and the rest are used. An answer emptied by ACLs (`X-Consul-Results-Filtered-By-ACLs:
true`, no entries: the token lost read access) keeps the last good endpoints, is counted, and
the plugin's state (`mesh.state()["services"][name]["consul"]["state"]`) says "filtered".

Many services on one agent share one client (one connection pool, one TLS context) and, past
`shared_above` services, one watch instead of a parked query each: a real Consul agent allows
200 connections per client address (`limits.http_max_conns_per_client`, hashicorp/consul#7289),
so a query per service cannot scale. The shared watch is one blocking query on
`/v1/health/state/any` (every check of every service; Consul's answer for watching many
services); when its index moves, the services whose checks changed (`CheckTable`: only the
part of the answer that differs from the last one is parsed) are read again with a non-blocking `/v1/health/service/<name>`, at most `READS` at a time. A
move that no check explains (an instance without checks, a node-level check) reads every
watched service again; and each service is read again about every `wait` regardless, because a
change Consul keeps out of the checks table (an instance re-registered in place with a new
address and unchanged checks) moves no check. See docs/registry.md "1,000 services on consul".

Failures (unreachable agent, 5xx, 403, 429, non-JSON, wrong shape, huge answers) keep the last
good endpoints: the error goes to `sink.error` (counted, shown in `mesh.state()`), and the
loop backs off with full jitter: 250 ms doubling to 60 s, consul-template's retry defaults
(hashicorp/consul-template config/retry.go: DefaultRetryBackoff 250ms, DefaultRetryMaxBackoff 1m).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio

import meshcore
from meshcore import describe_error as describe

from ._address import address_problem
from ._agent import (
    AgentClient,
    AgentConfig,
    AgentUnreachable,
    ConsulAnswerError,
    decode_json,
    error_text,
)
from ._checks import CheckTable

__all__ = [
    "AgentHub", "Answer", "ConsulDiscovery", "ResultsFilteredByACLs", "TokenBucket", "next_index",
    "parse_health",
]

STATUS_RANK = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 2}
# Targeted reads in flight at once per agent, in the shared mode: enough to load 1,000
# services in about a second on loopback, few enough to stay far below Consul's 200
# connections per client address.
READS = 4
# Up to this many services per agent, each gets its own blocking query (the lowest latency,
# one parked connection each); past it they share one watch (SHARED_ABOVE + READS + 2
# connections at most, whatever the number of services).
SHARED_ABOVE = 16


class ConsulUnreachable(Exception):
    """The agent could not be asked: connect, TLS, timeout. Names the agent and the cause."""

    def __init__(self, agent: AgentConfig, exc: BaseException) -> None:
        if isinstance(exc, AgentUnreachable):  # already names the error's type
            super().__init__(f"{agent.address.url}: {exc}")
            return
        super().__init__(f"{agent.address.url}: {describe(exc)}")


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, by Consul's rules."""
    if 0 < previous and returned < previous:
        return 0  # went backwards: start over with a non-blocking query
    return max(returned, 1)


class TokenBucket:
    """`rate` tokens per second, at most `burst` banked. `take()` waits for one (anyio clock)."""

    def __init__(self, rate: float, burst: int = 2) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp: float | None = None

    async def take(self) -> None:
        now = anyio.current_time()
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            delay = (1 - self.tokens) / self.rate
            await anyio.sleep(delay)
            self.stamp = anyio.current_time()
            self.tokens = 1.0
        self.tokens -= 1


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
           default: Any = None) -> Any:
    value = obj.get(key, default)
    cls = type(value)
    if cls is kind or cls is dict and kind is Mapping:  # the common case, without isinstance
        return value
    if value is None and default is not None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConsulAnswerError(f"{where}.{key}: expected {names}, got {value!r:.60}")
    return value


def parse_health(
    entries: Any, *, include_warning: bool = False, skipped: list[str] | None = None
) -> list[meshcore.Endpoint]:
    """Endpoints from a /v1/health/service answer.

    Address: `Service.Address`, else `Node.Address`. Weight: `Weights.Warning` when any check
    is warning, else `Weights.Passing` (Consul DNS's findWeight; default 1). Entries with a
    critical check are dropped (with `?passing` the agent already dropped them, and warning
    too unless `include_warning`). Zone: `Service.Meta["zone"]` when present.

    One malformed entry (`Port: 0`, an `Address` that is not a host name or IP literal, a
    wrong type) is skipped and its reason appended to `skipped`: one bad instance must not
    cost the good ones. An answer that is not a list, or whose every entry is malformed,
    raises ConsulAnswerError: then stale beats wrong.
    """
    if not isinstance(entries, list):
        raise ConsulAnswerError(f"expected a JSON array of health entries, got {type(entries).__name__}")
    endpoints = []
    reasons: list[str] = []
    for i, entry in enumerate(entries):
        try:
            endpoint = _entry_endpoint(entry, f"entry {i}", include_warning)
        except ConsulAnswerError as exc:
            reasons.append(str(exc))
            continue
        if endpoint is not None:
            endpoints.append(endpoint)
    if reasons and len(reasons) == len(entries):
        raise ConsulAnswerError(f"every entry is malformed; {reasons[0]}")
    if skipped is not None:
        skipped.extend(reasons)
    return endpoints


def _entry_endpoint(entry: Any, where: str, include_warning: bool) -> meshcore.Endpoint | None:
    """One health entry's endpoint, None when its checks exclude it; raises when malformed."""
    if not isinstance(entry, Mapping):
        raise ConsulAnswerError(f"{where}: expected an object, got {entry!r:.60}")
    service = _field(entry, "Service", Mapping, where)
    node = _field(entry, "Node", Mapping, where, {})
    checks = _field(entry, "Checks", list, where, [])
    where_s = f"{where}.Service"
    port = _field(service, "Port", int, where_s)
    if not 0 < port < 65536:
        raise ConsulAnswerError(f"{where_s}.Port: expected 1..65535, got {port}")
    address = _field(service, "Address", str, where_s, "") or _field(node, "Address", str, f"{where}.Node", "")
    if not address:
        raise ConsulAnswerError(f"{where}: neither Service.Address nor Node.Address is set")
    problem = address_problem(address)
    if problem is not None:
        raise ConsulAnswerError(f"{where}: address {address!r:.80} is {problem}")
    tags = _field(service, "Tags", list, where_s, [])
    if not all(isinstance(t, str) for t in tags):
        raise ConsulAnswerError(f"{where_s}.Tags: expected strings")
    meta = _field(service, "Meta", Mapping, where_s, {})
    if not all(isinstance(v, str) for v in meta.values()):
        raise ConsulAnswerError(f"{where_s}.Meta: expected string values")
    weights = _field(service, "Weights", Mapping, where_s, {})
    worst = 0
    for j, check in enumerate(checks):
        if not isinstance(check, Mapping):
            raise ConsulAnswerError(f"{where}.Checks[{j}]: expected an object")
        status = _field(check, "Status", str, f"{where}.Checks[{j}]")
        worst = max(worst, STATUS_RANK.get(status, 2))
    if worst >= 2 or (worst == 1 and not include_warning):
        return None
    key = "Warning" if worst == 1 else "Passing"
    weight = weights.get(key, 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise ConsulAnswerError(f"{where_s}.Weights.{key}: expected an integer >= 0, got {weight!r}")
    return meshcore.Endpoint(
        address, port, weight=weight, zone=meta.get("zone"), tags=tuple(tags),
        metadata=tuple(sorted(meta.items())),
    )


class ResultsFilteredByACLs(ConsulAnswerError):
    """The answer was emptied by ACLs: the token cannot read the service's instances."""


@dataclass(frozen=True)
class Answer:
    """One health answer: its index, the usable endpoints, the reasons entries were skipped,
    and whether ACLs emptied it (`X-Consul-Results-Filtered-By-ACLs: true` and no entries)."""

    index: int
    endpoints: list[meshcore.Endpoint]
    skipped: list[str]
    emptied_by_acls: bool


async def _get(
    client: AgentClient, path: str, params: list[tuple[str, str]], read_timeout: float, max_answer_size: int,
) -> tuple[bytes, int, bool]:
    """A read's body, its X-Consul-Index and whether ACLs filtered it; raises on any failure
    of the whole answer."""
    response = await client.get(path, params=params, read_timeout=read_timeout, max_bytes=max_answer_size)
    if response.status_code != 200:
        raise ConsulAnswerError(error_text(response))
    raw_index = response.headers.get("x-consul-index", "")
    filtered = response.headers.get("x-consul-results-filtered-by-acls", "").lower() == "true"
    if not raw_index.isdigit():
        raise ConsulAnswerError(f"missing or invalid X-Consul-Index header {raw_index!r}")
    return response.content, int(raw_index), filtered


class _Subscriber:
    __slots__ = ("discovery", "event", "sink")

    def __init__(self, discovery: ConsulDiscovery, sink: meshcore.DiscoverySink) -> None:
        self.discovery = discovery
        self.sink = sink
        self.event = anyio.Event()


class AgentHub:
    """What the consul discoveries of one agent share in one event loop: one client (one
    connection pool, one TLS context) and, past `shared_above` services, one blocking query
    on `/v1/health/state/any` that tells which services to read again.

    `AgentHub.acquire(agent, ...)` inside a task (equal agents share one), `await release()`
    when done. `serve()` is run by every shared-mode subscriber; one of them runs the watch at
    a time, and another takes over when it leaves.
    """

    # Keyed by thread too: anyio's objects belong to one event loop, one per thread.
    _hubs: dict[tuple[AgentConfig, int], AgentHub] = {}

    def __init__(
        self, agent: AgentConfig, *, shared_above: int = SHARED_ABOVE, wait: float = 60.0, backoff: float = 0.25,
        max_backoff: float = 60.0, churn_limit: float = 20.0, max_answer_size: int = 32 << 20,
    ) -> None:
        self.agent = agent
        self.shared_above = shared_above
        self.wait = wait
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.churn_limit = churn_limit
        self.max_answer_size = max_answer_size
        self.client = agent.client(max_connections=shared_above + READS + 2)
        self.reads = anyio.CapacityLimiter(READS)
        self.users = 0
        self.subscribers: dict[str, list[_Subscriber]] = {}
        self.table = CheckTable()  # the last answer of the watch
        self.baseline = False  # the watch has had an answer (since it last failed)
        self.index = 0
        # counters shown in state
        self.requests = 0
        self.errors = 0
        self.sweeps = 0  # moves no check explained: every watched service read again
        self.skipped = 0
        self.last_error: str | None = None
        self.last_skipped: str | None = None
        self._running = False
        self._runner_left = anyio.Event()

    # -- sharing ----------------------------------------------------------------------------

    @classmethod
    def acquire(cls, agent: AgentConfig, **options: Any) -> AgentHub:
        key = (agent, threading.get_ident())
        hub = cls._hubs.get(key)
        if hub is None:
            hub = cls._hubs[key] = cls(agent, **options)
        hub.users += 1
        return hub

    async def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            key = (self.agent, threading.get_ident())
            if self._hubs.get(key) is self:
                del self._hubs[key]
            with anyio.CancelScope(shield=True):
                await self.client.aclose()

    @property
    def shared(self) -> bool:
        return self.users > self.shared_above

    def subscribe(self, discovery: ConsulDiscovery, sink: meshcore.DiscoverySink) -> _Subscriber:
        sub = _Subscriber(discovery, sink)
        if self.baseline:  # the watch has its baseline: read at once
            sub.event.set()
        self.subscribers.setdefault(discovery.service, []).append(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        subs = self.subscribers.get(sub.discovery.service, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self.subscribers.pop(sub.discovery.service, None)

    def state(self) -> dict[str, Any]:
        """JSON-ready: the shared watch's index and counters."""
        return {
            "index": self.index, "services": len(self.subscribers), "requests": self.requests,
            "errors": self.errors, "last_error": self.last_error, "sweeps": self.sweeps,
            "skipped_checks": self.skipped, "last_skipped": self.last_skipped,
        }

    def _notify(self, names: Iterable[str]) -> None:
        for name in names:
            for sub in self.subscribers.get(name, ()):
                sub.event.set()

    def _report(self, exc: BaseException) -> None:
        """A failed watch: every subscriber counts and reports it, and keeps its endpoints."""
        self.errors += 1
        self.last_error = str(exc)
        for subs in self.subscribers.values():
            for sub in subs:
                sub.discovery.errors += 1
                sub.discovery.status = "error"
                sub.sink.error(exc)

    # -- the shared watch --------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the shared watch if nobody does, else wait to take over. Never returns."""
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

    async def _query(self) -> tuple[int, set[str]]:
        params: list[tuple[str, str]] = []
        if self.agent.datacenter:
            params.append(("dc", self.agent.datacenter))
        if self.index > 0:
            params += [("index", str(self.index)), ("wait", f"{self.wait:g}s")]
        read = self.agent.timeout + (self.wait * 17 / 16 if self.index > 0 else 0)
        self.requests += 1
        body, index, _ = await _get(self.client, "/v1/health/state/any", params, read, self.max_answer_size)
        skipped: list[str] = []
        changed = self.table.update(body, skipped)
        if skipped:
            self.skipped += len(skipped)
            self.last_skipped = skipped[0]
        return index, changed

    async def _run(self) -> None:
        bucket = TokenBucket(self.churn_limit, burst=2)
        backoff = self.backoff
        while True:
            await bucket.take()
            try:
                index, changed = await self._query()
            except Exception as exc:  # noqa: BLE001 - every failure is survived and counted
                self._report(exc if isinstance(exc, ConsulAnswerError) else ConsulUnreachable(self.agent, exc))
                self.index = 0  # the agent may be back at a lower index: start non-blocking
                await anyio.sleep(backoff * random.random())
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.backoff
            previous, first = self.index, not self.baseline
            went_back = 0 < previous and index < previous
            self.index = next_index(previous, index)
            self.baseline = True
            if first:
                # The baseline: every subscriber reads now, so a change from here on moves a check.
                self._notify(list(self.subscribers))
            elif went_back:
                self.sweeps += 1
                self._notify(list(self.subscribers))
            elif index != previous:
                if not changed or "" in changed:
                    # Nothing or a node-level check moved: which services that touched is
                    # unknown from here, so all of them are read again (bounded by READS).
                    self.sweeps += 1
                    self._notify(list(self.subscribers))
                else:
                    self._notify(changed)


class ConsulDiscovery:
    """Watches one service in Consul (or the embedded registry) and publishes its endpoints."""

    def __init__(
        self,
        agent: AgentConfig,
        service: str,
        *,
        tags: tuple[str, ...] = (),
        include_warning: bool = False,
        wait: float = 60.0,
        backoff: float = 0.25,
        max_backoff: float = 60.0,
        churn_limit: float = 20.0,
        max_answer_size: int = 32 << 20,
        shared_above: int = SHARED_ABOVE,
    ) -> None:
        self.agent = agent
        self.service = service
        self.tags = tags
        self.include_warning = include_warning
        self.wait = wait
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.churn_limit = churn_limit
        self.max_answer_size = max_answer_size
        self.shared_above = shared_above
        self.index = 0
        self.requests = 0
        self.errors = 0
        self.skipped = 0
        self.last_skipped: str | None = None
        self.filtered = 0
        self.status = "waiting"  # waiting, ok, filtered, error
        self.mode = "service"  # service: a blocking query of its own; shared: the agent's watch
        self._hub: AgentHub | None = None

    def _params(self) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        if not self.include_warning:
            params.append(("passing", "1"))
        params.extend(("tag", t) for t in self.tags)
        if self.agent.datacenter:
            params.append(("dc", self.agent.datacenter))
        if self.index > 0:
            params.append(("index", str(self.index)))
            params.append(("wait", f"{self.wait:g}s"))
        return params

    async def query(self, client: AgentClient) -> Answer:
        """One (blocking) query; raises on any failure of the whole answer."""
        read = self.agent.timeout + (self.wait * 17 / 16 if self.index > 0 else 0)
        self.requests += 1
        body, index, filtered = await _get(
            client, f"/v1/health/service/{quote(self.service, safe='')}", self._params(), read, self.max_answer_size)
        data = decode_json(body)
        skipped: list[str] = []
        endpoints = parse_health(data, include_warning=self.include_warning, skipped=skipped)
        return Answer(index, endpoints, skipped, filtered and not data)

    def state(self) -> dict[str, Any]:
        """JSON-ready, shown in `mesh.state()["services"][<name>]["consul"]`."""
        state: dict[str, Any] = {
            "state": self.status, "mode": self.mode, "requests": self.requests, "errors": self.errors,
            "skipped_entries": self.skipped, "last_skipped": self.last_skipped,
            "filtered_by_acls": self.filtered,
        }
        if self.mode == "shared" and self._hub is not None:
            state["watch"] = self._hub.state()
        return state

    async def watch(self, sink: meshcore.DiscoverySink) -> None:
        add_state = getattr(sink, "add_state", None)  # an Upstream offers it; a bare sink may not
        if add_state is not None:
            add_state("consul", self.state)
        # Each watch starts with a non-blocking query: this sink has been told nothing yet, and
        # an index kept from an earlier (cancelled) watch would block until the next change.
        self.index = 0
        self.mode = "service"
        hub = self._hub = AgentHub.acquire(
            self.agent, shared_above=self.shared_above, wait=self.wait, backoff=self.backoff,
            max_backoff=self.max_backoff, churn_limit=self.churn_limit, max_answer_size=self.max_answer_size)
        try:
            bucket = TokenBucket(self.churn_limit, burst=2)
            backoff = self.backoff
            # Few services on this agent: a blocking query of its own. Once more than
            # `shared_above` watch it, this one joins the shared watch at its next answer.
            while not hub.shared:
                await bucket.take()
                index = await self._step(hub.client, sink)
                if index is None:
                    # Full jitter, so a fleet of watchers does not hammer a recovering agent
                    # in step. The agent may have restarted without its data, at a lower
                    # index: a blocking query on the old index would then sit out the whole
                    # `wait` before the backwards index shows. Start over non-blocking.
                    self.index = 0
                    await anyio.sleep(backoff * random.random())
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                self.index, backoff = index, self.backoff
            self.mode = "shared"
            await self._watch_shared(hub, sink)
        finally:
            await hub.release()

    async def _step(self, client: AgentClient, sink: meshcore.DiscoverySink) -> int | None:
        """One query (blocking when `self.index` is set) and what follows from it: the next
        index, None after a failure (reported)."""
        try:
            answer = await self.query(client)
        except Exception as exc:  # noqa: BLE001 - every failure is survived and counted
            self.errors += 1
            self.status = "error"
            sink.error(exc if isinstance(exc, ConsulAnswerError) else ConsulUnreachable(self.agent, exc))
            return None
        index = next_index(self.index, answer.index)
        if answer.skipped:
            self.skipped += len(answer.skipped)
            self.last_skipped = answer.skipped[0]
        if answer.emptied_by_acls:
            # The token may no longer read the service (revoked, policy changed): an empty
            # answer says nothing about the instances, so keep the last good ones.
            self.filtered += 1
            self.status = "filtered"
            sink.error(ResultsFilteredByACLs(
                f"{self.service}: the answer was emptied by ACLs "
                "(X-Consul-Results-Filtered-By-ACLs: true); keeping the last endpoints"
            ))
        else:
            self.status = "ok"
            sink.publish(answer.endpoints)
        return index

    async def _watch_shared(self, hub: AgentHub, sink: meshcore.DiscoverySink) -> None:
        """Read the service whenever the agent's shared watch says its checks moved."""
        sub = hub.subscribe(self, sink)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(hub.serve)
                backoff = self.backoff
                while True:
                    # Read again every `wait` on average even when no check moved: Consul
                    # keeps some changes out of the checks table (an instance re-registered
                    # in place). Spread over half to one and a half `wait`, so services that
                    # started together are not all read again in one burst.
                    with anyio.move_on_after(self.wait * (0.5 + random.random())):
                        await sub.event.wait()
                    sub.event = anyio.Event()
                    while True:
                        self.index = 0  # a targeted read never blocks: the shared watch does
                        async with hub.reads:
                            index = await self._step(hub.client, sink)
                        if index is not None:
                            backoff = self.backoff
                            break
                        await anyio.sleep(backoff * random.random())
                        backoff = min(backoff * 2, self.max_backoff)
        finally:
            hub.unsubscribe(sub)
