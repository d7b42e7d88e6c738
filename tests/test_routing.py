"""Routes, subsets, weighted splits, filters, mirroring and fault injection in library mode
(docs/routing.md), against real loopback upstreams on asyncio and trio."""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest

import meshcore
from meshcore import ConfigError, FaultPolicy, Request
from meshcore._routing import BackendName, Route

pytestmark = pytest.mark.anyio


def versioned(servers: dict[str, Any], routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A service `orders` whose endpoints carry `version` metadata, one subset per version."""
    return {
        "discovery": "static",
        "balancer": "test-rr",
        "static": {
            "endpoints": [
                {"address": server.address, "metadata": {"version": version}}
                for version, server in servers.items()
            ]
        },
        "subsets": {version: {"metadata": {"version": version}} for version in servers},
        "routes": routes,
        **extra,
    }


def mesh_of(services: dict[str, Any]) -> meshcore.Mesh:
    from meshcore.testing import SimpleBalancers

    return meshcore.Mesh({"services": services}, extra_plugins=[("simple", SimpleBalancers())])


async def served_by(client: Any, path: str = "/", **kwargs: Any) -> str:
    response = await client.get(f"http://orders{path}", **kwargs)
    assert response.status_code == 200, response.text
    return str(response.headers["x-upstream"])


# -- weighted splits --------------------------------------------------------------------------


def test_weighted_pick_lands_within_three_points_over_2000_picks():
    route = Route("split", "orders")
    first = BackendName("orders/v1")
    route.set_backends([(first, 90), (BackendName("orders/v2"), 10)])  # type: ignore[list-item]
    draw = random.Random(23).random
    share = sum(route.pick(draw) is first for _ in range(2000)) / 2000
    assert 0.87 <= share <= 0.93


async def test_a_90_10_split_over_2000_requests(upstream):
    v1, v2 = upstream("v1"), upstream("v2")
    routes = [{"backendRefs": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}]
    async with mesh_of({"orders": versioned({"v1": v1, "v2": v2}, routes)}) as mesh:
        async with mesh.client() as client:
            for _ in range(2000):
                await served_by(client)
        state = mesh.state()["services"]["orders"]
    assert v1.requests + v2.requests == 2000
    assert 0.87 <= v1.requests / 2000 <= 0.93
    served = {b["backend"]: b["requests"] for b in state["routing"]["routes"][0]["backends"]}
    assert served == {"orders/v1": v1.requests, "orders/v2": v2.requests}
    # each subset has its own upstream: own stats, own endpoint set
    assert [ep["requests"] for ep in state["subsets"]["v2"]["endpoints"]] == [v2.requests]
    assert [ep["id"] for ep in state["subsets"]["v1"]["endpoints"]] == [v1.address]


# -- matches and precedence -------------------------------------------------------------------


async def test_header_method_query_and_path_matches_pick_the_backend(upstream):
    v1, v2, v3 = upstream("v1"), upstream("v2"), upstream("v3")
    routes = [
        {"matches": [{"headers": [{"name": "x-tester", "value": "yes"}]}], "backendRefs": [{"subset": "v2"}]},
        {"matches": [{"method": "POST"}], "backendRefs": [{"subset": "v3"}]},
        {"matches": [{"queryParams": [{"name": "beta", "value": "1"}]}], "backendRefs": [{"subset": "v3"}]},
        {"matches": [{"path": {"type": "Exact", "value": "/new"}}], "backendRefs": [{"subset": "v2"}]},
        {"matches": [{"path": {"type": "RegularExpression", "value": "/items/[0-9]+"}}], "backendRefs": [{"subset": "v3"}]},
    ]
    async with mesh_of({"orders": versioned({"v1": v1, "v2": v2, "v3": v3}, routes)}) as mesh:
        async with mesh.client() as client:
            assert {await served_by(client, "/") for _ in range(3)} == {"v1", "v2", "v3"}  # no match: all
            assert await served_by(client, "/", headers={"X-Tester": "yes"}) == "v2"
            assert await served_by(client, "/", headers={"X-Tester": "no"}) in {"v1", "v2", "v3"}
            assert (await client.post("http://orders/", content=b"x")).headers["x-upstream"] == "v3"
            assert await served_by(client, "/a?beta=1&x=2") == "v3"
            assert await served_by(client, "/new") == "v2"
            assert await served_by(client, "/items/42") == "v3"
        state = mesh.state()["services"]["orders"]["routing"]
    assert [r["matched"] for r in state["routes"]] == [1, 1, 1, 1, 1]
    assert state["unmatched"] == 4


async def test_precedence_follows_httproute(upstream):
    servers = {v: upstream(v) for v in ("v1", "v2", "v3", "v4", "v5")}
    routes = [
        # config order is the last tie-break, so list the weaker rules first
        {"name": "regex", "matches": [{"path": {"type": "RegularExpression", "value": "/api/.*"}}], "backendRefs": [{"subset": "v5"}]},
        {"name": "short", "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [{"subset": "v1"}]},
        {"name": "long", "matches": [{"path": {"type": "PathPrefix", "value": "/api/v2/"}}], "backendRefs": [{"subset": "v2"}]},
        {"name": "headers1", "matches": [{"path": {"type": "PathPrefix", "value": "/api/v2"},
                                          "headers": [{"name": "a", "value": "1"}]}], "backendRefs": [{"subset": "v3"}]},
        {"name": "headers2", "matches": [{"path": {"type": "PathPrefix", "value": "/api/v2"},
                                          "headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2", "type": "RegularExpression"}]}],
         "backendRefs": [{"subset": "v4"}]},
        {"name": "method", "matches": [{"path": {"type": "PathPrefix", "value": "/api/v2"}, "method": "DELETE"}], "backendRefs": [{"subset": "v5"}]},
        {"name": "exact", "matches": [{"path": {"type": "Exact", "value": "/api/v2/x"}}], "backendRefs": [{"subset": "v5"}]},
    ]
    async with mesh_of({"orders": versioned(servers, routes)}) as mesh:
        table = mesh.routers["orders"].table

        def winner(path: str, method: str = "GET", **headers: str) -> str:
            found = table.match(Request(method, f"http://orders{path}", list(headers.items())))
            return found.route.name if found else "-"

        assert winner("/api/v2/x") == "exact"  # Exact beats every prefix
        assert winner("/api/v2/y") == "long"  # longest prefix
        assert winner("/api/v2") == "long"  # prefix by path element, trailing slash ignored
        assert winner("/api/v20") == "short"  # "/api/v2" does not match "/api/v20"
        assert winner("/api/x") == "short"  # prefixes beat regexes
        assert winner("/other") == "-"
        assert winner("/api/v2/y", a="1") == "headers1"
        assert winner("/api/v2/y", a="1", b="2") == "headers2"  # more header matches
        assert winner("/api/v2/y", "DELETE", a="1", b="2") == "method"  # method before headers
        async with mesh.client() as client:
            assert await served_by(client, "/api/v2/y", headers={"a": "1", "b": "2"}) == "v4"


# -- filters ----------------------------------------------------------------------------------


async def test_header_modifiers_rewrite_and_redirect(upstream):
    v1 = upstream("v1")
    routes = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}, "statusCode": 301}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
         "filters": [
             {"type": "URLRewrite", "urlRewrite": {"hostname": "orders.internal", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/api"}}},
             {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-set", "value": "s"}], "add": {"x-add": "a"}, "remove": ["x-drop"]}},
             {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": {"x-route": "v1"}, "remove": ["x-upstream"]}},
         ]},
    ]
    async with mesh_of({"orders": versioned({"v1": v1}, routes)}) as mesh:
        async with mesh.client() as client:
            r = await client.get("http://orders/old/items?x=1")
            assert r.status_code == 301 and r.headers["location"] == "http://orders/new/items?x=1"
            assert v1.requests == 0
            r = await client.get("http://orders/v1/items/7?q=2", headers={"x-drop": "1", "x-set": "old"})
            assert r.status_code == 200 and r.headers["x-route"] == "v1" and "x-upstream" not in r.headers
    method, target, headers = v1.seen[-1]
    assert target == "/api/items/7?q=2"
    assert headers["host"] == "orders.internal"
    assert headers["x-set"] == "s" and headers["x-add"] == "a" and "x-drop" not in headers


async def test_a_route_timeout_reaches_the_timeout_layer(upstream):
    pytest.importorskip("meshcore_retry")
    v1 = upstream("v1", delay=2.0)
    routes = [{"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}], "timeouts": {"request": "100ms"}}]
    async with meshcore.Mesh({"services": {"orders": {**versioned({"v1": v1}, routes), "balancer": None, "resilience": ["timeout"]}}}, ["retry"]) as mesh:
        async with mesh.client() as client:
            # The route's 100 ms, not the upstream's answer after 2 s, ended the call.
            with pytest.raises(meshcore.DeadlineExceeded) as info:
                await client.get("http://orders/slow")
            assert "deadline of 0.1 s exceeded" in str(info.value)


# -- mirroring --------------------------------------------------------------------------------


def mirrored(primary: Any, mirror: Any, percent: int = 100) -> dict[str, Any]:
    return {
        "orders": versioned({"v1": primary}, [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}, "percent": percent}}]}]),
        "shadow": {"discovery": "static", "static": {"endpoints": [mirror if isinstance(mirror, str) else mirror.address]}},
    }


async def test_a_mirror_gets_a_copy_of_each_request(upstream):
    primary, shadow = upstream("primary"), upstream("shadow")
    async with mesh_of(mirrored(primary, shadow)) as mesh:
        async with mesh.client() as client:
            for i in range(20):
                assert (await client.post(f"http://orders/p{i}", content=b"body")).headers["x-upstream"] == "primary"
        with anyio.fail_after(5):
            while shadow.requests < 20:
                await anyio.sleep(0.01)
        mirror_state = mesh.state()["services"]["orders"]["routing"]["routes"][0]["filters"][0]
    assert shadow.requests == 20
    assert shadow.seen[-1][2]["host"] == "orders-shadow"
    assert mirror_state["sent"] == 20 and mirror_state["dropped"] == 0


async def test_a_slow_or_down_mirror_does_not_touch_the_caller(upstream):
    from meshcore.testing import free_port

    primary, slow = upstream("primary"), upstream("slow", delay=3.0)
    for mirror in (slow, f"127.0.0.1:{free_port()}"):
        async with mesh_of(mirrored(primary, mirror)) as mesh:
            async with mesh.client() as client:
                start = anyio.current_time()
                for _ in range(5):
                    r = await client.get("http://orders/")
                    assert r.status_code == 200 and r.headers["x-upstream"] == "primary"
                assert anyio.current_time() - start < 1.0
            state = mesh.state()["services"]["orders"]["routing"]["routes"][0]["filters"][0]
            assert state["sent"] == 5
        # leaving the mesh cancels mirrors still in flight: nothing outlives it
        assert mesh.mirrors_in_flight == 0


async def test_mirror_copies_past_the_concurrency_bound_are_dropped_and_counted(upstream, monkeypatch):
    import meshcore._route_kinds as kinds

    monkeypatch.setattr(kinds, "MIRROR_CONCURRENCY", 2)
    primary, slow = upstream("primary"), upstream("slow", delay=3.0)
    async with mesh_of(mirrored(primary, slow)) as mesh:
        async with mesh.client() as client:
            for _ in range(5):
                assert (await client.get("http://orders/")).status_code == 200
        state = mesh.state()["services"]["orders"]["routing"]["routes"][0]["filters"][0]
        assert mesh.mirrors_in_flight == 2
    assert state["sent"] == 2 and state["dropped"] == 3


# -- fault injection --------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [10, 50])
def test_fault_percentages_land_within_three_points_over_2000_requests(percent):
    policy = FaultPolicy(delay=0.1, delay_percent=percent, status=503, abort_percent=percent)
    draw = random.Random(percent).random
    decisions = [policy.decide(draw) for _ in range(2000)]
    delayed = sum(1 for d, _ in decisions if d) / 20
    aborted = sum(1 for _, s in decisions if s) / 20
    assert abs(delayed - percent) <= 3 and abs(aborted - percent) <= 3
    assert FaultPolicy().decide(draw) == (0.0, 0)  # off by default


async def test_fault_injection_aborts_and_delays_and_shows_in_state(upstream):
    v1 = upstream("v1")
    routes = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/abort"}}], "fault": {"abort": {"percent": 100, "httpStatus": 503}}},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/delay"}}], "fault": {"delay": {"percent": 100, "fixedDelay": "200ms"}}},
    ]
    async with mesh_of({"orders": versioned({"v1": v1}, routes)}) as mesh:
        async with mesh.client() as client:
            r = await client.get("http://orders/abort")
            assert r.status_code == 503 and r.headers["x-meshcore-fault"] == "abort"
            start = anyio.current_time()
            assert (await client.get("http://orders/delay")).status_code == 200
            assert anyio.current_time() - start >= 0.2
        routes_state = mesh.state()["services"]["orders"]["routing"]["routes"]
    assert v1.requests == 1
    assert routes_state[0]["FAULT_INJECTION"]["aborted"] == 1
    assert routes_state[1]["FAULT_INJECTION"]["delayed"] == 1
    assert routes_state[1]["FAULT_INJECTION"]["delay"] == {"percent": 100.0, "fixedDelay": 0.2}


# -- bad routes -------------------------------------------------------------------------------


def service_with(routes: Any, **extra: Any) -> dict[str, Any]:
    return {"services": {"orders": {"discovery": "static", "static": {"endpoints": [
        {"address": "127.0.0.1:1", "metadata": {"version": "v1"}}]},
        "subsets": {"v1": {"metadata": {"version": "v1"}}}, "routes": routes, **extra}}}


@pytest.mark.parametrize(
    ("routes", "path", "words"),
    [
        ([{"backendRefs": [{"name": "nope"}]}], "services.orders.routes[0].backendRefs[0].name", "unknown backend service 'nope'"),
        ([{"backendRefs": [{"subset": "v9"}]}], "services.orders.routes[0].backendRefs[0].subset", "no subset 'v9'"),
        ([{"backendRefs": [{"subset": "v1", "weight": 0}]}], "services.orders.routes[0].backendRefs", "sum to 0"),
        ([{"matches": [{"path": {"type": "RegularExpression", "value": "/a(["}}]}], "services.orders.routes[0].matches[0].path.value", "does not compile"),
        ([{}, {"matches": [{"headers": [{"name": "a", "value": "(", "type": "RegularExpression"}]}]}], "services.orders.routes[1].matches[0].headers", "does not compile"),
        ([{"matches": [{"path": {"type": "Prefix", "value": "/"}}]}], "services.orders.routes[0].matches[0].path.type", "PathPrefix"),
        ([{"matches": [{"cookie": "x"}]}], "services.orders.routes[0].matches[0].cookie", "unknown match kind 'cookie'"),
        ([{"filters": [{"type": "Nope"}]}], "services.orders.routes[0].filters[0].type", "unknown filter type 'Nope'"),
        ([{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "x"}}}]}],
         "services.orders.routes[0].filters[0].requestMirror.backendRef.name", "unknown backend service 'x'"),
        ([{"fault": {"abort": {"percent": 150, "httpStatus": 503}}}], "services.orders.routes[0].fault.abort.percent", "percentage"),
        ([{"timeouts": {"request": "soon"}}], "services.orders.routes[0].timeouts.request", "duration"),
        ([{"timeouts": {"request": "1s"}}], "services.orders.routes[0].timeouts.request", "needs the 'timeout' layer"),
        ([{"retry": {"attempts": 2}}], "services.orders.routes[0].retry", "needs the 'retry' layer"),
        ([{"backendRef": []}], "services.orders.routes[0]", "unknown key(s) ['backendRef']"),
        ("x", "services.orders.routes", "array of tables"),
    ],
)
def test_bad_routes_name_the_key_path(routes, path, words):
    with pytest.raises(ConfigError) as info:
        meshcore.Mesh(service_with(routes))
    assert info.value.path == path and words in str(info.value), str(info.value)


def test_bad_subsets_name_the_key_path():
    with pytest.raises(ConfigError) as info:
        meshcore.Mesh(service_with([], subsets={"v2": {"labels": {}}}))
    assert info.value.path == "services.orders.subsets.v2" and "labels" in str(info.value)
    with pytest.raises(ConfigError) as info:
        meshcore.Mesh({"defaults": {"routes": []}, "services": {}})
    assert info.value.path == "defaults.routes"


def test_routes_load_from_toml(tmp_path):
    (tmp_path / "mesh.toml").write_text(
        '[services.orders]\ndiscovery = "static"\nstatic.endpoints = ["127.0.0.1:1"]\n'
        '[services.orders.routes.canary]\nmatches = [{ path = { type = "Exact", value = "/x" } }]\n'
    )
    mesh = meshcore.Mesh.from_config(tmp_path / "mesh.toml")
    assert mesh.config.services["orders"].routes[0]["name"] == "canary"


# -- plugins: the meshcore_route_matches / meshcore_route_filters hooks -------------------------

from meshcore.testing.conformance.routing import RouteFilterConformance, RouteMatchConformance  # noqa: E402


class CookiePlugin:
    """A match kind `cookies = [{ name, value }]` and a filter kind `Stamp`, inline."""

    factory_calls = 0

    @meshcore.hookimpl
    def meshcore_route_matches(self) -> dict[str, Any]:
        def cookies(spec: Any, ctx: meshcore.MatchContext) -> Any:
            CookiePlugin.factory_calls += 1
            if not isinstance(spec, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in spec):
                raise ValueError(f"expected [{{ name, value }}], got {spec!r}")
            wanted = {f"{c['name']}={c['value']}" for c in spec}

            def match(request: Request) -> bool:
                jar = {p.strip() for p in (request.headers.get("cookie") or "").split(";")}
                return wanted <= jar

            return match

        return {"cookies": cookies}

    @meshcore.hookimpl
    def meshcore_route_filters(self) -> dict[str, Any]:
        class Stamp:
            def __init__(self, spec: Any, ctx: meshcore.MatchContext) -> None:
                if not isinstance(spec, dict) or not isinstance(spec.get("value"), str):
                    raise ValueError(f"value: expected a string, got {spec!r}")
                self.value = spec["value"].encode()

            def request(self, request: Request, matched: meshcore.RouteMatch) -> None:
                request.headers.append((b"x-stamp", self.value))

        return {"Stamp": Stamp}


class TestCookieMatchConformance(RouteMatchConformance):
    kind = "cookies"
    extra_plugins = [("cookies", CookiePlugin())]
    spec = [{"name": "beta", "value": "1"}]
    matching = [("cookie", "a=b; beta=1")]
    not_matching = [("cookie", "beta=0")]
    bad_spec = [{"name": 3}]


class TestStampFilterConformance(RouteFilterConformance):
    kind = "Stamp"
    extra_plugins = [("cookies", CookiePlugin())]
    spec = {"value": "x"}
    bad_spec = {"value": 3}


class TestBuiltinHeadersMatchConformance(RouteMatchConformance):
    kind = "headers"
    spec = [{"name": "x-tester", "value": "yes"}]
    matching = [("x-tester", "yes")]
    not_matching = [("x-tester", "no")]
    bad_spec = [{"name": "x", "value": "(", "type": "RegularExpression"}]


class TestBuiltinRedirectFilterConformance(RouteFilterConformance):
    kind = "RequestRedirect"
    spec = {"statusCode": 308}
    bad_spec = {"statusCode": 200}


async def test_a_plugin_match_and_filter_kind_route_requests(upstream):
    primary, beta = upstream("primary"), upstream("beta")
    CookiePlugin.factory_calls = 0
    config = {"services": {
        "orders": {"discovery": "static", "static": {"endpoints": [primary.address]}, "routes": [
            {"matches": [{"cookies": [{"name": "beta", "value": "1"}]}], "backendRefs": [{"name": "beta"}],
             "filters": [{"type": "Stamp", "stamp": {"value": "from-plugin"}}]}]},
        "beta": {"discovery": "static", "static": {"endpoints": [beta.address]}},
    }}
    async with meshcore.Mesh(config, extra_plugins=[("cookies", CookiePlugin())]) as mesh:
        calls = CookiePlugin.factory_calls
        async with mesh.client() as client:
            for _ in range(3):
                assert (await client.get("http://orders/", headers={"cookie": "beta=1"})).headers["x-upstream"] == "beta"
            assert (await client.get("http://orders/")).headers["x-upstream"] == "primary"
        assert CookiePlugin.factory_calls == calls  # compiled at load, never per request
    assert beta.seen[-1][2]["x-stamp"] == "from-plugin"


def test_a_kind_registered_twice_is_an_error():
    with pytest.raises(meshcore.PluginError, match="'headers' is registered by two plugins"):
        class Again:
            @meshcore.hookimpl
            def meshcore_route_matches(self) -> dict[str, Any]:
                return {"headers": lambda spec, ctx: (lambda request: True)}

        meshcore.Mesh(service_with([]), extra_plugins=[("again", Again())])


async def test_the_canary_example_of_docs_routing_md_runs(upstream):
    import re
    import tomllib
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "routing.md").read_text()
    block = re.findall(r"```toml\n(.*?)```", doc, re.S)[0]
    v1, v2 = upstream("v1"), upstream("v2")
    config = tomllib.loads(block.replace("127.0.0.1:8001", v1.address).replace("127.0.0.1:8002", v2.address))
    async with meshcore.Mesh(config, ["round-robin"]) as mesh:
        async with mesh.client() as client:
            for _ in range(500):
                assert (await client.get("http://orders/")).status_code == 200
            pinned = {(await client.get("http://orders/", headers={"x-canary": "always"})).headers["x-upstream"] for _ in range(20)}
    assert pinned == {"v2"}
    assert 0.85 <= v1.requests / 500 <= 0.95


def test_weighted_pick_gives_each_backend_exactly_its_share_of_the_unit_interval():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(deadline=None, max_examples=30)
    @given(st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=20).filter(any))
    def check(weights: list[int]) -> None:
        route = Route("r", "s")
        backends = [BackendName(f"b{i}") for i in range(len(weights))]
        route.set_backends(list(zip(backends, weights)))  # type: ignore[arg-type]
        total = sum(weights)
        n = total * 7
        counts: dict[str, int] = {}
        for k in range(n):  # evenly spaced draws over [0, 1), off the bucket edges
            name = route.pick(lambda k=k: (k + 0.5) / n).name
            counts[name] = counts.get(name, 0) + 1
        assert counts == {b.name: w * 7 for b, w in zip(backends, weights) if w}

    check()


async def test_the_plugin_example_of_docs_routing_md_runs(upstream):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "routing.md").read_text()
    plugin_code, suite_code = re.findall(r"```python\n(.*?)```", doc, re.S)
    namespace: dict[str, Any] = {}
    exec(compile(plugin_code, "docs/routing.md", "exec"), namespace)
    exec(compile(suite_code, "docs/routing.md", "exec"), namespace)
    assert issubclass(namespace["TestCookies"], RouteMatchConformance)
    primary, beta = upstream("primary"), upstream("beta")
    config = {"services": {
        "orders": {"discovery": "static", "static": {"endpoints": [primary.address]}, "routes": [
            {"matches": [{"cookies": [{"name": "beta", "value": "1"}]}], "backendRefs": [{"name": "beta"}],
             "filters": [{"type": "Stamp", "stamp": {"value": "doc"}}]}]},
        "beta": {"discovery": "static", "static": {"endpoints": [beta.address]}},
    }}
    async with meshcore.Mesh(config, extra_plugins=[("cookies", namespace["Cookies"]())]) as mesh:
        async with mesh.client() as client:
            r = await client.get("http://orders/", headers={"cookie": "beta=1"})
    assert r.headers["x-upstream"] == "beta" and beta.seen[-1][2]["x-stamp"] == "doc"
    with pytest.raises(ConfigError) as info:
        meshcore.Mesh({"services": {"orders": {**config["services"]["orders"], "routes": [
            {"matches": [{"cookies": "x"}]}]}}}, extra_plugins=[("cookies", namespace["Cookies"]())])
    assert info.value.path == "services.orders.routes[0].matches[0].cookies"
