"""`RouteMatchConformance` and `RouteFilterConformance`: the contract of route match kinds and
route filter kinds (the `meshcore_route_matches` / `meshcore_route_filters` hooks).

    from meshcore.testing.conformance.routing import RouteMatchConformance

    class TestCookieMatch(RouteMatchConformance):
        kind = "cookies"                       # the key in a route's `matches` table
        extra_plugins = [("cookies", CookiePlugin())]   # or plugins = ["cookies"]
        spec = [{"name": "beta", "value": "1"}]
        matching = [("cookie", "beta=1")]      # request headers that match
        not_matching = [("cookie", "beta=0")]  # request headers that do not
        bad_spec = {"name": 3}                 # must fail at load naming the key path

    class TestStampFilter(RouteFilterConformance):
        kind = "Stamp"                         # the filter's `type`
        extra_plugins = [("stamp", StampPlugin())]
        spec = {"value": "x"}
        bad_spec = {"value": 3}

What it checks: the kind is registered under its name by exactly the plugin; a bad spec is a
`ConfigError` whose key path ends at the kind's table; the factory is only called at load
(never per request); a match selects exactly the requests it should, end to end over a real
loopback upstream, without changing the request; a filter's request passes through (or is
answered locally with a Response), `mesh.state()` stays JSON-serializable, and 50 concurrent
requests through the route all complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio
import pytest

import meshcore
from meshcore.testing import static_service

__all__ = ["RouteFilterConformance", "RouteMatchConformance"]


class _Base:
    kind: ClassVar[str] = ""
    plugins: ClassVar[Sequence[str]] = ()
    extra_plugins: ClassVar[Sequence[tuple[str, Any]]] = ()
    spec: ClassVar[Any] = None
    bad_spec: ClassVar[Any] = None
    hook: ClassVar[str] = ""

    def route(self, spec: Any) -> dict[str, Any]:
        raise NotImplementedError

    def config(self, servers: Sequence[Any], spec: Any) -> dict[str, Any]:
        primary, other = servers
        return {
            "services": {
                "orders": {**static_service([primary]), "routes": [self.route(spec)]},
                "other": static_service([other]),
            }
        }

    def mesh(self, config: Mapping[str, Any]) -> meshcore.Mesh:
        return meshcore.Mesh(config, list(self.plugins), extra_plugins=list(self.extra_plugins))

    def test_the_kind_is_registered(self) -> None:
        from meshcore._routing import route_kinds

        mesh = self.mesh({})
        matches, filters = route_kinds(mesh.plugins)
        assert self.kind in (matches if self.hook == "meshcore_route_matches" else filters)

    def test_a_bad_spec_names_the_key_path(self) -> None:
        assert self.bad_spec is not None, "set bad_spec: a spec the factory must refuse"
        config = self.config(["127.0.0.1:1", "127.0.0.1:2"], self.bad_spec)
        with pytest.raises(meshcore.ConfigError) as info:
            self.mesh(config)
        assert info.value.path.startswith("services.orders.routes[0].")
        assert self._key() in info.value.path

    def _key(self) -> str:
        return self.kind


class RouteMatchConformance(_Base):
    """Base class of a route match kind's conformance tests (see the module docstring)."""

    hook = "meshcore_route_matches"
    matching: ClassVar[Sequence[tuple[str, str]]] = ()
    not_matching: ClassVar[Sequence[tuple[str, str]]] = ()
    path: ClassVar[str] = "/"

    def route(self, spec: Any) -> dict[str, Any]:
        return {"matches": [{self.kind: spec}], "backendRefs": [{"name": "other"}]}

    @pytest.mark.anyio
    async def test_it_selects_exactly_the_matching_requests(self, upstream: Any) -> None:
        primary, other = upstream("primary"), upstream("other")
        async with self.mesh(self.config([primary, other], self.spec)) as mesh:
            async with mesh.client() as client:
                hit = await client.get(f"http://orders{self.path}", headers=list(self.matching))
                miss = await client.get(f"http://orders{self.path}", headers=list(self.not_matching))
            json.dumps(mesh.state())
        assert hit.headers["x-upstream"] == "other", "a matching request must take the route"
        assert miss.headers["x-upstream"] == "primary", "a request that does not match must not"
        sent = {k.lower(): v for k, v in self.matching}
        seen = other.seen[-1][2]
        assert all(seen.get(k) == v for k, v in sent.items()), "a match must not change the request"


class RouteFilterConformance(_Base):
    """Base class of a route filter kind's conformance tests (see the module docstring)."""

    hook = "meshcore_route_filters"

    def _key(self) -> str:
        from meshcore._routing import filter_key

        return filter_key(self.kind)

    def route(self, spec: Any) -> dict[str, Any]:
        from meshcore._routing import filter_key

        return {"filters": [{"type": self.kind, filter_key(self.kind): spec}]}

    @pytest.mark.anyio
    async def test_requests_pass_or_are_answered_and_concurrency_holds(self, upstream: Any) -> None:
        primary, other = upstream("primary"), upstream("other")
        statuses: list[int] = []
        async with self.mesh(self.config([primary, other], self.spec)) as mesh:
            async with mesh.client() as client:

                async def one() -> None:
                    statuses.append((await client.get("http://orders/x")).status_code)

                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for _ in range(50):
                            tg.start_soon(one)
            json.dumps(mesh.state())
        assert len(statuses) == 50
        assert all(100 <= s <= 599 for s in statuses)
