"""Routes: which backend (a service, or a subset of its endpoints) a request goes to.

The model is the Kubernetes Gateway API's HTTPRoute (apis/v1/httproute_types.go): each entry
of `[[services.<name>.routes]]` is one HTTPRoute *rule*, with `matches`, `filters`,
`backendRefs` and `timeouts` under the same names, plus Istio's `fault` and a `retry` override.
Everything is compiled when the mesh loads its config (`compile_routes`); the request path is
a few dict lookups, the match predicates of the candidates and one weighted pick.

Precedence follows HTTPRoute ("Rule precedence"): an Exact path match, then the longest
PathPrefix (by path element), then RegularExpression paths (implementation-specific in the
spec; meshcore ranks them last, in config order, as Envoy does for its regex routes); ties go
to a method match, then the most header matches, then the most query matches, then config
order. A request no route matches goes to the service's default backend (all its endpoints).

Match kinds (`method`, `headers`, `queryParams`) and filter kinds (`RequestHeaderModifier`,
..., `RequestMirror`) are registered through the `meshcore_route_matches` and
`meshcore_route_filters` hooks, built-ins included (`meshcore._route_kinds`); `path` is
structural (it is the index), so it is not a hook kind.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._errors import ConfigError, PluginError
from ._models import Request, Response
from ._settings import parse_duration

if TYPE_CHECKING:
    from ._config import MeshConfig, ServiceConfig
    from ._mesh import Mesh
    from ._plugins import Plugins
    from ._upstream import Upstream

__all__ = [
    "BackendName",
    "FaultPolicy",
    "MatchContext",
    "RouteFilter",
    "RouteMatchFactory",
    "RouteFilterFactory",
    "Router",
    "check_subsets",
    "compile_routes",
    "subset_config",
]

PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
_MATCH_CORE = ("path",)
_ROUTE_KEYS = {"name", "matches", "backendRefs", "filters", "timeouts", "retry", "fault"}
_BACKEND_KEYS = {"name", "subset", "weight"}
_SUBSET_KEYS = {"metadata", "tags"}
# The extension keys of the first-party `timeout` and `retry` layers (meshcore-servicemesh-retry)
# through which a route's `timeouts` and `retry` reach them.
TIMEOUT_EXTENSION = "meshcore.timeout"
RETRY_EXTENSION = "meshcore.retry"


@dataclass(frozen=True)
class BackendName:
    """Stands in for a backend while the config is only being checked (no upstreams yet)."""

    name: str

    def send(self, request: Request) -> Awaitable[Response]:
        raise RuntimeError(f"{self.name}: the mesh is not running")


@dataclass(frozen=True)
class MatchContext:
    """What a match or filter factory gets besides its own table: where it is (for errors),
    the mesh, and `backend(ref)` to resolve a `{ name, subset }` backendRef."""

    mesh: Mesh
    service: str
    route: str
    path: str  # key path of the table, e.g. services.orders.routes[0].matches[1].headers
    backends: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def backend(self, ref: Any, key: str = "backendRef") -> Any:
        """The backend (an object with `name` and `send(request)`) a backendRef names; a bad
        or unknown ref raises ConfigError with the key path `<path>.<key>`."""
        return _backend(self.mesh.config, self.backends, self.service, ref,
                        self.mesh.config.source, f"{self.path}.{key}")


def _random() -> float:
    """`random.random()`, the default draw of a weighted pick or a fault decision: `random`
    loads with the first draw, not with this module (a sidecar whose services have no routes
    never draws; docs/data-path.md, "Start-up time and idle memory")."""
    import random

    return random.random()


class RouteFilter(Protocol):
    """A compiled filter. `request` may change the request in place and returns None, or a
    Response the mesh answers with instead (a redirect); `response` may change the response.
    Both are plain, synchronous calls on the request path: they must not block."""

    def request(self, request: Request, matched: RouteMatch) -> Response | None: ...

    def response(self, request: Request, response: Response) -> None: ...


RouteMatchFactory = Callable[[Any, MatchContext], Callable[[Request], bool]]
RouteFilterFactory = Callable[[Any, MatchContext], RouteFilter]


# -- subsets ----------------------------------------------------------------------------------


def check_subsets(svc: ServiceConfig, source: str) -> dict[str, Callable[[Any], bool]]:
    selectors: dict[str, Callable[[Any], bool]] = {}
    for name, table in svc.subsets.items():
        where = f"services.{svc.name}.subsets.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"expected a table {{ metadata = {{...}}, tags = [...] }}, got {table!r}", source=source, path=where)
        unknown = set(table) - _SUBSET_KEYS
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)}; known: {sorted(_SUBSET_KEYS)}", source=source, path=where)
        metadata = table.get("metadata", {})
        tags = table.get("tags", [])
        if not isinstance(metadata, Mapping) or not all(isinstance(v, str) for v in metadata.values()):
            raise ConfigError(f"expected a table of strings, got {metadata!r}", source=source, path=f"{where}.metadata")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError(f"expected a list of strings, got {tags!r}", source=source, path=f"{where}.tags")
        if not metadata and not tags:
            raise ConfigError("a subset selects endpoints by `metadata` and/or `tags`; both are empty", source=source, path=where)
        selectors[name] = _selector(frozenset(metadata.items()), frozenset(tags))
    return selectors


def _selector(metadata: frozenset[tuple[str, str]], tags: frozenset[str]) -> Callable[[Any], bool]:
    def selects(endpoint: Any) -> bool:
        return metadata <= set(endpoint.metadata) and tags <= set(endpoint.tags)

    return selects


def subset_config(svc: ServiceConfig, subset: str) -> ServiceConfig:
    """The derived service a subset runs as: the parent's pipeline under `parent/subset`."""
    return replace(svc, name=f"{svc.name}/{subset}", routes=(), subsets={})


# -- matching ---------------------------------------------------------------------------------


class RouteMatch:
    """One compiled entry of a route's `matches`: the path part is the index; the rest are
    predicates, all of which must hold. `rank` orders ties within one path bucket."""

    __slots__ = ("route", "path_type", "path_value", "predicates", "rank", "index", "test")

    def __init__(
        self, route: Route, path_type: str, path_value: str,
        predicates: tuple[Callable[[Request], bool], ...], rank: tuple[int, ...], index: int,
    ) -> None:
        self.route = route
        self.path_type = path_type
        self.path_value = path_value
        self.predicates = predicates
        self.rank = rank
        self.index = index
        # The predicates as one call (None: none), so the common cases cost one call or none.
        self.test: Callable[[Request], bool] | None = (
            None if not predicates else predicates[0] if len(predicates) == 1
            else lambda request: all(p(request) for p in predicates)
        )


def _prefix_key(value: str) -> str:
    """PathPrefix matches by path element ("/foo" matches "/foo" and "/foo/x", not "/foobar"),
    so prefixes are indexed without their trailing slash."""
    return value.rstrip("/") or "/"


def _combine(patterns: Sequence[re.Pattern[str]]) -> tuple[re.Pattern[str] | None, dict[int, int]]:
    """One alternation of every path regex, and which regex each outer group stands for; None
    when a pattern refers to its own groups (a backreference would shift) or there is one."""
    if len(patterns) < 2 or any(re.search(r"\\[1-9]|\(\?P=|\(\?\(", p.pattern) for p in patterns):
        return None, {}
    index: dict[int, int] = {}
    group = 1
    for i, p in enumerate(patterns):
        index[group] = i
        group += 1 + p.groups
    try:
        return re.compile("|".join(f"({p.pattern})" for p in patterns)), index
    except re.error:  # e.g. the same group name in two patterns
        return None, {}


class RouteTable:
    """The compiled matcher of one service: exact paths, prefixes and regexes, in precedence."""

    __slots__ = ("exact", "prefix", "regex", "routes", "combined", "group_index")

    def __init__(self, routes: Sequence[Route], entries: Sequence[RouteMatch]) -> None:
        self.routes = tuple(routes)
        exact: dict[str, list[RouteMatch]] = {}
        prefix: dict[str, list[RouteMatch]] = {}
        regex: list[tuple[re.Pattern[str], RouteMatch]] = []
        for entry in entries:
            if entry.path_type == "Exact":
                exact.setdefault(entry.path_value, []).append(entry)
            elif entry.path_type == "PathPrefix":
                prefix.setdefault(_prefix_key(entry.path_value), []).append(entry)
            else:
                regex.append((re.compile(entry.path_value), entry))
        def order(e: RouteMatch) -> tuple[int, ...]:
            return (*e.rank, e.index)

        self.exact = {k: tuple(sorted(v, key=order)) for k, v in exact.items()}
        self.prefix = {k: tuple(sorted(v, key=order)) for k, v in prefix.items()}
        regex.sort(key=lambda pair: order(pair[1]))
        self.regex = tuple(regex)
        self.combined, self.group_index = _combine([p for p, _ in self.regex])

    def match(self, request: Request) -> RouteMatch | None:
        """The winning match for `request`, or None."""
        path = request.url.target.partition("?")[0]
        found = self.exact.get(path)
        if found is not None:
            for entry in found:
                if entry.test is None or entry.test(request):
                    return entry
        prefix = self.prefix
        if prefix:
            # Walk the path's element prefixes, longest first: "/a/b/c", "/a/b", "/a", "/".
            end = len(path.rstrip("/"))
            while True:
                found = prefix.get(path[:end] if end > 0 else "/")
                if found is not None:
                    for entry in found:
                        if entry.test is None or entry.test(request):
                            return entry
                if end <= 0:
                    break
                end = path.rfind("/", 0, end)
        if self.regex:
            return self._match_regex(path, request)
        return None

    def _match_regex(self, path: str, request: Request) -> RouteMatch | None:
        start = 0
        combined = self.combined
        if combined is not None:
            # One call finds the first regex that matches (alternation is tried in order);
            # only if its predicates fail does the scan go on from there.
            m = combined.fullmatch(path)
            if m is None:
                return None
            start = self.group_index[m.lastindex or 0]
        for pattern, entry in self.regex[start:]:
            if pattern.fullmatch(path) and (entry.test is None or entry.test(request)):
                return entry
        return None


# -- faults -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultPolicy:
    """Istio's HTTPFaultInjection: delay `delay_percent` % of requests by `delay`, abort
    `abort_percent` % with `status`. The two draws are independent, as in Envoy's fault filter."""

    delay: float = 0.0
    delay_percent: float = 0.0
    status: int = 0
    abort_percent: float = 0.0

    def decide(self, draw: Callable[[], float] = _random) -> tuple[float, int]:
        """(seconds to delay, status to abort with or 0) for one request."""
        delay = self.delay if self.delay_percent and draw() * 100 < self.delay_percent else 0.0
        status = self.status if self.abort_percent and draw() * 100 < self.abort_percent else 0
        return delay, status

    def as_dict(self) -> dict[str, Any]:
        return {
            "delay": {"percent": self.delay_percent, "fixedDelay": self.delay},
            "abort": {"percent": self.abort_percent, "httpStatus": self.status},
        }


def _percent(value: Any, source: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ConfigError(f"expected a percentage 0-100, got {value!r}", source=source, path=path)
    return float(value)


def _fault(table: Any, source: str, path: str) -> FaultPolicy | None:
    if not isinstance(table, Mapping) or set(table) - {"delay", "abort"}:
        raise ConfigError(
            "expected { delay = { percent, fixedDelay }, abort = { percent, httpStatus } }, "
            f"got {table!r}", source=source, path=path,
        )
    policy = FaultPolicy()
    delay = table.get("delay")
    if delay is not None:
        if not isinstance(delay, Mapping) or set(delay) - {"percent", "fixedDelay"} or "fixedDelay" not in delay:
            raise ConfigError(f"expected {{ percent, fixedDelay }}, got {delay!r}", source=source, path=f"{path}.delay")
        try:
            seconds = parse_duration(delay["fixedDelay"])
        except ValueError as exc:
            raise ConfigError(str(exc), source=source, path=f"{path}.delay.fixedDelay") from None
        policy = replace(policy, delay=seconds, delay_percent=_percent(delay.get("percent", 100), source, f"{path}.delay.percent"))
    abort = table.get("abort")
    if abort is not None:
        if not isinstance(abort, Mapping) or set(abort) - {"percent", "httpStatus"} or "httpStatus" not in abort:
            raise ConfigError(f"expected {{ percent, httpStatus }}, got {abort!r}", source=source, path=f"{path}.abort")
        status = abort["httpStatus"]
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise ConfigError(f"expected an HTTP status 200-599, got {status!r}", source=source, path=f"{path}.abort.httpStatus")
        policy = replace(policy, status=status, abort_percent=_percent(abort.get("percent", 100), source, f"{path}.abort.percent"))
    return policy


# -- routes -----------------------------------------------------------------------------------


_ABORT_BODY = b"fault filter abort\n"
_ABORT_HEADERS = (
    (b"content-type", b"text/plain"),
    (b"content-length", b"%d" % len(_ABORT_BODY)),
    (b"x-meshcore-fault", b"abort"),
)


@dataclass
class RouteStats:
    """One route's counters for /state and /metrics."""

    matched: int = 0
    aborted: int = 0
    delayed: int = 0
    answered_locally: int = 0
    backends: dict[str, int] = field(default_factory=dict)


class Route:
    """One compiled route (an HTTPRoute rule): its backends by weight, filters, overrides."""

    def __init__(self, name: str, service: str) -> None:
        self.name = name
        self.service = service
        self.backends: tuple[Upstream, ...] = ()
        self.weights: tuple[int, ...] = ()
        self._cumulative: list[int] = []
        self._total = 0
        self.filters: tuple[RouteFilter, ...] = ()
        self.response_filters: tuple[RouteFilter, ...] = ()
        self.extensions: dict[str, Any] = {}
        self.fault: FaultPolicy | None = None
        self.stats = RouteStats()
        self.spec: dict[str, Any] = {}

    def set_backends(self, backends: Sequence[tuple[Upstream, int]]) -> None:
        kept = [(up, w) for up, w in backends if w > 0]
        self.backends = tuple(up for up, _ in kept)
        self.weights = tuple(w for _, w in kept)
        total = 0
        self._cumulative = []
        for _, w in kept:
            total += w
            self._cumulative.append(total)
        self._total = total
        self.stats.backends = {up.name: 0 for up in self.backends}

    def pick(self, draw: Callable[[], float] = _random) -> Upstream:
        """A backend by weight: one draw and a bisection over the cumulative weights."""
        if len(self.backends) == 1:
            return self.backends[0]
        return self.backends[bisect.bisect_right(self._cumulative, draw() * self._total)]

    def send(self, request: Request, matched: RouteMatch) -> Awaitable[Response]:
        self.stats.matched += 1
        if self.filters or self.response_filters or self.fault is not None or self.extensions:
            return self._send_filtered(request, matched)
        backend = self.pick()
        self.stats.backends[backend.name] += 1
        return backend.send(request)

    async def _send_filtered(self, request: Request, matched: RouteMatch) -> Response:
        stats = self.stats
        if self.fault is not None:
            delay, status = self.fault.decide()
            if delay:
                stats.delayed += 1
                await anyio.sleep(delay)
            if status:
                stats.aborted += 1
                return Response(status, _ABORT_HEADERS, _ABORT_BODY)
        for extension, value in self.extensions.items():
            request.extensions.setdefault(extension, value)
        for f in self.filters:
            local = f.request(request, matched)
            if local is not None:
                stats.answered_locally += 1
                return local
        backend = self.pick()
        stats.backends[backend.name] += 1
        response = await backend.send(request)
        for f in self.response_filters:
            f.response(request, response)
        return response

    def state(self) -> dict[str, Any]:
        s = self.stats
        out: dict[str, Any] = {
            "name": self.name,
            "matched": s.matched,
            "backends": [
                {"backend": up.name, "weight": w, "requests": s.backends.get(up.name, 0)}
                for up, w in zip(self.backends, self.weights)
            ],
            "answered_locally": s.answered_locally,
        }
        if self.fault is not None:
            out["FAULT_INJECTION"] = {**self.fault.as_dict(), "delayed": s.delayed, "aborted": s.aborted}
        for f in (*self.filters, *self.response_filters):
            state = getattr(f, "state", None)
            if state is not None:
                out.setdefault("filters", []).append(state())
        return out


class Router:
    """What `Mesh.route` returns for a service with routes: the same `name` and `send` as an
    Upstream, so library mode and the sidecar's outbound side need nothing else."""

    def __init__(self, upstream: Upstream, table: RouteTable) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self.table = table
        self.unmatched = 0

    def send(self, request: Request) -> Awaitable[Response]:
        matched = self.table.match(request)
        if matched is None:
            self.unmatched += 1
            return self.upstream.send(request)
        return matched.route.send(request, matched)

    def state(self) -> dict[str, Any]:
        return {
            "unmatched": self.unmatched,
            "routes": [route.state() for route in self.table.routes],
        }


# -- compiling --------------------------------------------------------------------------------


def route_kinds(plugins: Plugins) -> tuple[dict[str, RouteMatchFactory], dict[str, RouteFilterFactory]]:
    """Every match and filter kind the loaded plugins register; a name twice is an error."""
    found: list[dict[str, Any]] = [{}, {}]
    for i, hook in enumerate(("meshcore_route_matches", "meshcore_route_filters")):
        owners: dict[str, str] = {}
        for plugin, table in plugins.route_kinds(hook):
            if table is not None and not isinstance(table, Mapping):
                raise PluginError(f"plugin {plugin!r}: {hook} must return a mapping of name to factory, got {table!r}")
            for name, factory in (table or {}).items():
                if name in owners:
                    raise PluginError(
                        f"{hook}: kind {name!r} is registered by two plugins: "
                        f"{owners[name]!r} and {plugin!r}"
                    )
                if not callable(factory):
                    raise PluginError(f"plugin {plugin!r}: {hook}[{name!r}] is not callable")
                owners[name] = plugin
                found[i][name] = factory
    return found[0], found[1]


def filter_key(kind: str) -> str:
    """HTTPRoute's field for a filter's table: the type in lower camel case
    (`RequestMirror` -> `requestMirror`, `URLRewrite` -> `urlRewrite`)."""
    upper = len(kind) - len(kind.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    if upper > 1 and upper < len(kind):
        upper -= 1  # the last capital of a run starts the next word
    return kind[:upper].lower() + kind[upper:]


def _call_factory(factory: Callable[..., Any], spec: Any, ctx: MatchContext, source: str) -> Any:
    try:
        return factory(spec, ctx)
    except ConfigError:
        raise
    except (ValueError, TypeError, re.error) as exc:
        raise ConfigError(str(exc), source=source, path=ctx.path) from None


def compile_routes(mesh: Mesh, config: MeshConfig, backends: Mapping[str, Any]) -> dict[str, RouteTable]:
    """Check every service's routes and compile them. `backends` has every service and
    subset (`"orders/v2"`) by name; raises ConfigError with the key path."""
    source = config.source
    matchers, filters = route_kinds(mesh.plugins)
    tables: dict[str, RouteTable] = {}
    for name, svc in config.services.items():
        if not svc.routes:
            continue
        routes: list[Route] = []
        entries: list[RouteMatch] = []
        for i, spec in enumerate(svc.routes):
            base = f"services.{name}.routes[{i}]"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"expected a table, got {spec!r}", source=source, path=base)
            unknown = set(spec) - _ROUTE_KEYS
            if unknown:
                raise ConfigError(f"unknown key(s) {sorted(unknown)}; known: {sorted(_ROUTE_KEYS)}", source=source, path=base)
            route = Route(str(spec.get("name") or f"{name}-{i}"), name)
            route.spec = dict(spec)
            routes.append(route)
            route.set_backends(_backends(config, backends, name, spec.get("backendRefs"), source, f"{base}.backendRefs"))
            matches = spec.get("matches", [{}])
            if not isinstance(matches, list) or not matches:
                raise ConfigError(f"expected a non-empty list of match tables, got {matches!r}", source=source, path=f"{base}.matches")
            for j, match in enumerate(matches):
                entries.append(_match(mesh, backends, route, match, matchers, len(entries), source, f"{base}.matches[{j}]"))
            _filters(mesh, backends, route, spec.get("filters", []), filters, source, f"{base}.filters")
            if "timeouts" in spec:
                _timeouts(route, spec["timeouts"], source, f"{base}.timeouts")
            if "retry" in spec:
                retry = spec["retry"]
                if not isinstance(retry, Mapping):
                    raise ConfigError(f"expected a table of retry settings, got {retry!r}", source=source, path=f"{base}.retry")
                route.extensions[RETRY_EXTENSION] = {**route.extensions.get(RETRY_EXTENSION, {}), **retry}
            if "fault" in spec:
                route.fault = _fault(spec["fault"], source, f"{base}.fault")
            _check_layers(config, route, source, base)
        tables[name] = RouteTable(routes, entries)
    return tables


def _backends(
    config: MeshConfig, backends: Mapping[str, Any], service: str, refs: Any, source: str, path: str
) -> list[tuple[Upstream, int]]:
    if refs is None:
        return [(backends[service], 1)]
    if not isinstance(refs, list) or not refs:
        raise ConfigError(f"expected a non-empty list of {{ name, subset, weight }}, got {refs!r}", source=source, path=path)
    out = []
    for k, ref in enumerate(refs):
        where = f"{path}[{k}]"
        up = _backend(config, backends, service, ref, source, where)
        weight = ref.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ConfigError(f"expected an integer ≥ 0, got {weight!r}", source=source, path=f"{where}.weight")
        out.append((up, weight))
    if sum(w for _, w in out) == 0:
        raise ConfigError("the weights sum to 0: no backend would get a request", source=source, path=path)
    return out


def _backend(config: MeshConfig, backends: Mapping[str, Any], service: str, ref: Any, source: str, where: str) -> Any:
    """A backendRef `{ name = service, subset = "v2" }` (name defaults to the route's service)."""
    if not isinstance(ref, Mapping) or set(ref) - _BACKEND_KEYS:
        raise ConfigError(f"expected {{ name, subset, weight }}, got {ref!r}", source=source, path=where)
    target = ref.get("name", service)
    if target not in config.services:
        raise ConfigError(
            f"unknown backend service {target!r} (services: {', '.join(config.services)})",
            source=source, path=f"{where}.name",
        )
    subset = ref.get("subset")
    if subset is None:
        return backends[target]
    found = backends.get(f"{target}/{subset}")
    if found is None:
        known = ", ".join(config.services[target].subsets) or "none"
        raise ConfigError(
            f"service {target!r} has no subset {subset!r} (its subsets: {known}; declare it "
            f"under [services.{target}.subsets.{subset}])",
            source=source, path=f"{where}.subset",
        )
    return found


def _match(
    mesh: Mesh, backends: Mapping[str, Any], route: Route, match: Any, matchers: Mapping[str, RouteMatchFactory],
    index: int, source: str, path: str,
) -> RouteMatch:
    if not isinstance(match, Mapping):
        raise ConfigError(f"expected a table, got {match!r}", source=source, path=path)
    spec = match.get("path", {"type": "PathPrefix", "value": "/"})
    if not isinstance(spec, Mapping) or set(spec) - {"type", "value"}:
        raise ConfigError(f'expected {{ type = "Exact"|"PathPrefix"|"RegularExpression", value }}, got {spec!r}', source=source, path=f"{path}.path")
    path_type = spec.get("type", "PathPrefix")
    value = spec.get("value", "/")
    if path_type not in PATH_TYPES:
        raise ConfigError(f"expected one of {', '.join(PATH_TYPES)}, got {path_type!r}", source=source, path=f"{path}.path.type")
    if not isinstance(value, str) or (path_type != "RegularExpression" and not value.startswith("/")):
        raise ConfigError(f"expected a path starting with '/', got {value!r}", source=source, path=f"{path}.path.value")
    if path_type == "RegularExpression":
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"regular expression does not compile: {exc}", source=source, path=f"{path}.path.value") from None
    predicates = []
    extra = 0
    for key, value_spec in match.items():
        if key in _MATCH_CORE:
            continue
        factory = matchers.get(key)
        if factory is None:
            known = ", ".join(["path", *sorted(matchers)])
            raise ConfigError(f"unknown match kind {key!r} (match kinds of loaded plugins: {known})", source=source, path=f"{path}.{key}")
        ctx = MatchContext(mesh, route.service, route.name, f"{path}.{key}", backends)
        predicates.append(_call_factory(factory, value_spec, ctx, source))
        if key not in ("method", "headers", "queryParams"):
            extra += 1
    def count(key: str) -> int:
        value = match.get(key)
        return len(value) if isinstance(value, list) else 0

    # Ascending sort: a method match first, then more headers, more query params, more others.
    rank = (0 if "method" in match else 1, -count("headers"), -count("queryParams"), -extra)
    return RouteMatch(route, path_type, value, tuple(predicates), rank, index)


def _filters(
    mesh: Mesh, backends: Mapping[str, Any], route: Route, specs: Any, filters: Mapping[str, RouteFilterFactory], source: str, path: str
) -> None:
    if not isinstance(specs, list):
        raise ConfigError(f"expected a list of filter tables, got {specs!r}", source=source, path=path)
    req: list[RouteFilter] = []
    resp: list[RouteFilter] = []
    for k, spec in enumerate(specs):
        where = f"{path}[{k}]"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
            raise ConfigError(f'expected {{ type = "<filter kind>", <kind> = {{...}} }}, got {spec!r}', source=source, path=where)
        kind = spec["type"]
        factory = filters.get(kind)
        if factory is None:
            known = ", ".join(sorted(filters)) or "none"
            raise ConfigError(f"unknown filter type {kind!r} (filter kinds of loaded plugins: {known})", source=source, path=f"{where}.type")
        key = filter_key(kind)
        unknown = set(spec) - {"type", key}
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)}; a {kind} filter has `type` and `{key}`", source=source, path=where)
        ctx = MatchContext(mesh, route.service, route.name, f"{where}.{key}", backends)
        compiled = _call_factory(factory, spec.get(key, {}), ctx, source)
        if getattr(type(compiled), "request", None) is not None:
            req.append(compiled)
        if getattr(type(compiled), "response", None) is not None:
            resp.append(compiled)
    route.filters = tuple(req)
    route.response_filters = tuple(resp)


def _check_layers(config: MeshConfig, route: Route, source: str, base: str) -> None:
    """A route's timeouts and retry act through the `timeout` and `retry` layers: a backend
    without them would silently ignore the setting, so say so at load."""
    needs = []
    if TIMEOUT_EXTENSION in route.extensions:
        needs.append(("timeout", "timeouts.request"))
    if RETRY_EXTENSION in route.extensions:
        key = "retry" if "retry" in route.spec else "timeouts.backendRequest"
        needs.append(("retry", key))
    for layer, key in needs:
        for backend in route.backends:
            service = backend.name.partition("/")[0]
            if layer not in config.services[service].resilience:
                raise ConfigError(
                    f"needs the {layer!r} layer in services.{service}.resilience (backend "
                    f"{backend.name!r} has {list(config.services[service].resilience)})",
                    source=source, path=f"{base}.{key}",
                )


def _timeouts(route: Route, spec: Any, source: str, path: str) -> None:
    if not isinstance(spec, Mapping) or set(spec) - {"request", "backendRequest"}:
        raise ConfigError(f"expected {{ request, backendRequest }} durations, got {spec!r}", source=source, path=path)
    for key, extension in (("request", TIMEOUT_EXTENSION), ("backendRequest", RETRY_EXTENSION)):
        if key not in spec:
            continue
        try:
            seconds = parse_duration(spec[key])
        except ValueError as exc:
            raise ConfigError(str(exc), source=source, path=f"{path}.{key}") from None
        if extension == TIMEOUT_EXTENSION:
            route.extensions[TIMEOUT_EXTENSION] = seconds or None
        else:
            route.extensions[RETRY_EXTENSION] = {**route.extensions.get(RETRY_EXTENSION, {}), "per_try_timeout": seconds}
