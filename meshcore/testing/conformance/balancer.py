"""The contract every balancer plugin is held to. Subclass `BalancerConformance` in your tests.

    from meshcore.testing.conformance.balancer import BalancerConformance

    class TestMyBalancerConformance(BalancerConformance):
        plugins = ["my-plugin"]          # the plugin list that provides the kind
        kind = "my-balancer"             # the balancer kind under test
        settings = {"mode": "fast"}      # optional: the kind's settings table

pytest collects the inherited tests in the subclass (the base class name does not start with
`Test`, so it is never collected on its own). Every test runs on asyncio and trio against a real
`Mesh` with static discovery; the end-to-end test sends real requests to loopback upstreams.

What is checked (hookspecs.py, `meshcore_balancer`, is the source of the rules):

- picks are made for requests with varied headers, paths and queries (and some with none;
  override `request(n)` to add the header your balancer hashes), and every rule below holds
  for all of them;
- `pick` is synchronous and returns an endpoint of the snapshot it was given, and every endpoint
  of an equal-weight snapshot is reached;
- a new snapshot is followed at once (removed endpoints are never picked again);
- an ejected endpoint is never picked unless every endpoint is ejected; then the balancer picks
  among all of them and counts a panic (`upstream.count_panic()`); a restored endpoint returns;
- endpoints in `exclude` are avoided whenever another non-ejected endpoint exists, and an
  endpoint is still returned when everything is excluded;
- `observe(outcome)`, when the balancer has it, takes successes, 5xx and errors without raising;
- real requests with those headers reach every upstream, and none reaches an ejected one;
- the plugin's factories answer None for every kind it does not declare (the core asks only a
  kind's owner, but a factory that answers for others is a bug waiting for another host);
- an unknown setting in the kind's table is a `ConfigError` naming the key path.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar

import pytest

from ... import ConfigError, Endpoint, EndpointConnectError, Outcome, Request, Upstream
from .._helpers import static_service
from ._kinds import answers_for_foreign_kinds

__all__ = ["BalancerConformance"]

_SERVICE = "svc"


def endpoints(count: int, *, first: int = 1, weight: int = 1) -> list[Endpoint]:
    """`count` distinct endpoints on documentation addresses (pick tests never connect)."""
    return [Endpoint(f"192.0.2.{i}", 8000 + i, weight=weight) for i in range(first, first + count)]


class BalancerConformance:
    """Inherited tests for one balancer kind. Set `plugins`, `kind` and maybe `settings`."""

    pytestmark = pytest.mark.anyio

    plugins: ClassVar[Sequence[str]] = ()
    kind: ClassVar[str] = ""
    settings: ClassVar[Mapping[str, Any]] = {}
    extra_plugins: ClassVar[Sequence[tuple[str, Any]]] = ()
    #: picks per check; enough that a fair balancer reaches every one of a handful of endpoints
    picks: int = 400

    # -- helpers a subclass may use in its own tests ------------------------------------------

    def config(self, entries: Sequence[Any], **extra: Any) -> dict[str, Any]:
        tables: dict[str, Any] = {self.kind: dict(self.settings)} if self.settings else {}
        tables.update(extra)
        service = static_service(entries, balancer=self.kind, **tables)
        return {"services": {_SERVICE: service}}

    @contextlib.asynccontextmanager
    async def running(self, mesh_factory: Any, entries: Sequence[Any]) -> AsyncIterator[Upstream]:
        """The Upstream of a started mesh whose one service has `entries` as endpoints."""
        mesh = mesh_factory(
            self.config(entries), plugins=list(self.plugins), extra_plugins=self.extra_plugins
        )
        async with mesh:
            upstream = mesh.upstream(_SERVICE)
            await upstream.wait_ready(5)
            assert upstream.snapshot.endpoints, "static discovery did not publish"
            yield upstream

    def request(self, n: int) -> Request:
        """The `n`-th request the picks are made for. Three in four carry headers, a path and a
        query that change from pick to pick (what a hashing balancer keys on), one in four none
        at all, so every path through a balancer is held to the same rules. Override it to add
        the header your balancer reads."""
        if n % 4 == 0:
            return Request("GET", f"http://{_SERVICE}/")
        headers = [
            ("x-request-id", f"r{n}"),
            ("x-user-id", f"user-{n % 37}"),
            ("x-tenant", f"t{n % 11}"),
            ("cookie", f"session=s{n % 29}"),
            ("authorization", f"Bearer k{n % 31}"),
            ("user-agent", f"conformance/{n % 7}"),
        ]
        return Request("GET", f"http://{_SERVICE}/items/{n % 41}?page={n % 13}", headers)

    def pick(self, upstream: Upstream, exclude: Sequence[Endpoint] = ()) -> Endpoint:
        n = self.__dict__.setdefault("_count", itertools.count())
        request = self.request(next(n))
        assert upstream.balancer is not None, "the service has no balancer"
        return upstream.balancer.pick(upstream.snapshot, request, tuple(exclude))

    def picks_of(self, upstream: Upstream, count: int | None = None, **kw: Any) -> list[Endpoint]:
        return [self.pick(upstream, **kw) for _ in range(count or self.picks)]

    # -- the contract -------------------------------------------------------------------------

    async def test_kind_is_a_balancer(self, mesh_factory: Any) -> None:
        async with self.running(mesh_factory, endpoints(2)) as upstream:
            assert upstream.mesh.plugins.kinds[self.kind].family == "balancer"
            assert upstream.balancer is not None
            assert callable(upstream.balancer.pick)

    async def test_picks_are_synchronous_and_reach_every_endpoint(self, mesh_factory: Any) -> None:
        eps = endpoints(5)
        async with self.running(mesh_factory, eps) as upstream:
            picked = self.picks_of(upstream)
        assert all(isinstance(ep, Endpoint) for ep in picked), "pick must return an Endpoint"
        assert set(picked) == set(eps)

    async def test_single_endpoint(self, mesh_factory: Any) -> None:
        eps = endpoints(1)
        async with self.running(mesh_factory, eps) as upstream:
            assert set(self.picks_of(upstream, 20)) == set(eps)
            # excluded but alone: still returned
            assert self.pick(upstream, exclude=eps) == eps[0]

    async def test_follows_snapshot_changes(self, mesh_factory: Any) -> None:
        async with self.running(mesh_factory, endpoints(4)) as upstream:
            self.picks_of(upstream, 10)
            newer = endpoints(3, first=3)  # keeps .3 and .4, drops .1 and .2, adds .5
            upstream.publish(newer)
            assert set(self.picks_of(upstream)) == set(newer)
            upstream.publish(endpoints(1, first=9))
            assert set(self.picks_of(upstream, 20)) == set(endpoints(1, first=9))

    async def test_never_picks_an_ejected_endpoint(self, mesh_factory: Any) -> None:
        eps = endpoints(5)
        async with self.running(mesh_factory, eps) as upstream:
            self.picks_of(upstream, 10)
            upstream.eject(eps[0], 60)
            upstream.eject(eps[3], 60)
            picked = self.picks_of(upstream)
            assert upstream.panics == 0
        assert set(picked) == {eps[1], eps[2], eps[4]}

    async def test_panic_mode_when_every_endpoint_is_ejected(self, mesh_factory: Any) -> None:
        eps = endpoints(3)
        async with self.running(mesh_factory, eps) as upstream:
            for ep in eps:
                upstream.eject(ep, 60)
            picked = self.picks_of(upstream, 60)
            assert upstream.panics == 60, "every panic pick must call upstream.count_panic()"
            assert set(picked) == set(eps)
            upstream.restore(eps[1])
            assert set(self.picks_of(upstream, 30)) == {eps[1]}
            assert upstream.panics == 60

    async def test_restored_endpoint_is_picked_again(self, mesh_factory: Any) -> None:
        eps = endpoints(3)
        async with self.running(mesh_factory, eps) as upstream:
            upstream.eject(eps[2], 60)
            assert eps[2] not in self.picks_of(upstream)
            upstream.restore(eps[2])
            assert eps[2] in self.picks_of(upstream)

    async def test_exclude_is_avoided_when_another_endpoint_exists(self, mesh_factory: Any) -> None:
        eps = endpoints(5)
        async with self.running(mesh_factory, eps) as upstream:
            assert set(self.picks_of(upstream, 100, exclude=eps[:4])) == {eps[4]}
            assert set(self.picks_of(upstream, exclude=eps[:2])) == set(eps[2:])
            everything = self.picks_of(upstream, 50, exclude=eps)
            assert set(everything) <= set(eps)

    async def test_ejection_wins_over_exclude(self, mesh_factory: Any) -> None:
        eps = endpoints(3)
        async with self.running(mesh_factory, eps) as upstream:
            upstream.eject(eps[0], 60)
            # eps[2] is the only endpoint neither ejected nor excluded
            assert set(self.picks_of(upstream, 100, exclude=[eps[1]])) == {eps[2]}
            # nothing healthy is left un-excluded: a healthy (excluded) one beats an ejected one
            assert set(self.picks_of(upstream, 100, exclude=eps[1:])) <= set(eps[1:])
            assert upstream.panics == 0

    async def test_observe_takes_every_kind_of_outcome(self, mesh_factory: Any) -> None:
        # Balancers without observe() are held to the same: outcomes must not disturb picks.
        eps = endpoints(3)
        async with self.running(mesh_factory, eps) as upstream:
            error = EndpointConnectError("refused", endpoint=eps[0], service=_SERVICE)
            outcomes = [
                Outcome(_SERVICE, eps[0], "GET", 200, None, 0.002),
                Outcome(_SERVICE, eps[1], "GET", 503, None, 0.0),
                Outcome(_SERVICE, eps[2], "GET", None, error, 1.5),
                Outcome(_SERVICE, endpoints(1, first=99)[0], "GET", 200, None, 0.01),  # unknown
            ]
            for outcome in outcomes * 5:
                upstream.record(outcome)  # the core's feedback path: stats, then observers
            assert set(self.picks_of(upstream)) <= set(eps)

    async def test_requests_reach_every_real_upstream(self, upstream: Any, mesh_factory: Any) -> None:
        servers = [upstream(f"c{i}") for i in range(3)]
        mesh = mesh_factory(
            self.config(servers), plugins=list(self.plugins), extra_plugins=self.extra_plugins
        )
        async with mesh, mesh.client() as client:
            for n in range(60):
                request = self.request(n)
                response = await client.get(
                    str(request.url), headers=[(k.decode(), v.decode()) for k, v in request.headers]
                )
                assert response.status_code == 200
            # with one endpoint ejected, no request reaches it, headers or not
            upstream = mesh.upstream(_SERVICE)
            ejected = next(ep for ep in upstream.snapshot.endpoints if ep.port == servers[0].port)
            upstream.eject(ejected, 60)
            before = len(servers[0].seen)
            for n in range(60):
                request = self.request(n)
                response = await client.get(
                    str(request.url), headers=[(k.decode(), v.decode()) for k, v in request.headers]
                )
                assert response.status_code == 200
        assert all(server.seen for server in servers), [len(s.seen) for s in servers]
        assert len(servers[0].seen) == before, "requests reached an ejected endpoint"

    async def test_factory_answers_only_for_its_own_kinds(self, mesh_factory: Any) -> None:
        async with self.running(mesh_factory, endpoints(2)) as upstream:
            wrong = answers_for_foreign_kinds(upstream.mesh, self.kind)
        assert not wrong, "\n".join(wrong)

    async def test_unknown_setting_is_a_config_error_naming_the_key(self, mesh_factory: Any) -> None:
        config = self.config(endpoints(2), **{self.kind: {**self.settings, "no-such-key": 1}})
        with pytest.raises(ConfigError) as info:
            mesh_factory(config, plugins=list(self.plugins), extra_plugins=self.extra_plugins)
        assert f"services.{_SERVICE}.{self.kind}.no-such-key" in str(info.value)
