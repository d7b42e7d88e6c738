"""The built-in route match kinds and filter kinds, registered through the same hooks a
third-party plugin uses (`meshcore_route_matches`, `meshcore_route_filters`).

Field names are the Gateway API HTTPRoute's (apis/v1/httproute_types.go): `headers` and
`queryParams` are lists of `{ name, value, type = "Exact" | "RegularExpression" }`; filters
are `{ type = "RequestHeaderModifier", requestHeaderModifier = { set, add, remove } }` and so on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import anyio

from ._models import URL, Headers, Request, Response
from ._plugins import hookimpl

if TYPE_CHECKING:
    from ._routing import MatchContext, RouteMatch

_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
# A mirror copy that has not finished after this long is abandoned: it must never pile up.
_MIRROR_TIMEOUT = 10.0
# Mirrored requests in flight per mesh; past it copies are dropped (and counted), so a slow
# mirror costs the mesh bounded memory and never back-pressures the caller.
MIRROR_CONCURRENCY = 64


def _exact(value: str) -> Callable[[str | None], bool]:
    return lambda got: got == value


def _regex(pattern: re.Pattern[str]) -> Callable[[str | None], bool]:
    return lambda got: got is not None and pattern.fullmatch(got) is not None


def _string_matches(spec: Any, what: str) -> list[tuple[str, Callable[[str | None], bool]]]:
    """`[{ name, value, type }]` to (name, test) pairs; names compare case-insensitively."""
    if not isinstance(spec, list):
        raise ValueError(f"expected a list of {{ name, value, type }} tables, got {spec!r}")
    out = []
    for i, item in enumerate(spec):
        if not isinstance(item, Mapping) or set(item) - {"name", "value", "type"}:
            raise ValueError(f"{what}[{i}]: expected {{ name, value, type }}, got {item!r}")
        name, value, kind = item.get("name"), item.get("value"), item.get("type", "Exact")
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValueError(f"{what}[{i}]: `name` and `value` must be strings, got {item!r}")
        if kind == "Exact":
            test = _exact(value)
        elif kind == "RegularExpression":
            try:
                test = _regex(re.compile(value))
            except re.error as exc:
                raise ValueError(f"{what}[{i}].value: regular expression does not compile: {exc}") from None
        else:
            raise ValueError(f'{what}[{i}].type: expected "Exact" or "RegularExpression", got {kind!r}')
        out.append((name, test))
    return out


def method_match(spec: Any, ctx: MatchContext) -> Callable[[Request], bool]:
    if spec not in _METHODS:
        raise ValueError(f"expected one of {', '.join(_METHODS)}, got {spec!r}")
    return lambda request: request.method == spec


def headers_match(spec: Any, ctx: MatchContext) -> Callable[[Request], bool]:
    tests = [(name.lower().encode("latin-1"), test) for name, test in _string_matches(spec, "headers")]

    def match(request: Request) -> bool:
        for name, test in tests:
            # First value of the header, as HTTPRoute's Exact header match reads it.
            got = None
            for k, v in request.headers:
                if k.lower() == name:
                    got = v.decode("latin-1")
                    break
            if not test(got):
                return False
        return True

    return match


def query_match(spec: Any, ctx: MatchContext) -> Callable[[Request], bool]:
    tests = _string_matches(spec, "queryParams")

    def match(request: Request) -> bool:
        query = request.url.target.partition("?")[2]
        if not query:
            return all(test(None) for _, test in tests)
        params: dict[str, str] = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            params.setdefault(k, v)  # the first value, as the spec says
        return all(test(params.get(name)) for name, test in tests)

    return match


@hookimpl
def meshcore_route_matches() -> dict[str, Any]:
    return {"method": method_match, "headers": headers_match, "queryParams": query_match}


# -- filters ----------------------------------------------------------------------------------


def _pairs(spec: Any, what: str) -> list[tuple[bytes, bytes]]:
    """HTTPRoute's `[{ name, value }]`, or a plain table `{ name = value }`."""
    items = spec.items() if isinstance(spec, Mapping) else None
    if items is None:
        if not isinstance(spec, list) or not all(
            isinstance(i, Mapping) and set(i) == {"name", "value"} for i in spec
        ):
            raise ValueError(f"{what}: expected [{{ name, value }}] or a table of strings, got {spec!r}")
        items = [(i["name"], i["value"]) for i in spec]
    out = []
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"{what}: header names and values must be strings, got {name!r} = {value!r}")
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    return out


class HeaderModifier:
    """The `{ set, add, remove }` of RequestHeaderModifier and ResponseHeaderModifier."""

    def __init__(self, spec: Any) -> None:
        if not isinstance(spec, Mapping) or set(spec) - {"set", "add", "remove"}:
            raise ValueError(f"expected {{ set, add, remove }}, got {spec!r}")
        self.set = _pairs(spec.get("set", []), "set")
        self.add = _pairs(spec.get("add", []), "add")
        remove = spec.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(r, str) for r in remove):
            raise ValueError(f"remove: expected a list of header names, got {remove!r}")
        drop = {r.lower().encode("latin-1") for r in remove} | {n.lower() for n, _ in self.set}
        self.drop = frozenset(drop)

    def apply(self, headers: Headers) -> None:
        if self.drop:
            headers[:] = [(k, v) for k, v in headers if k.lower() not in self.drop]
        headers.extend(self.set)
        headers.extend(self.add)


class RequestHeaderModifier:
    def __init__(self, spec: Any, ctx: MatchContext) -> None:
        self.modifier = HeaderModifier(spec)

    def request(self, request: Request, matched: RouteMatch) -> Response | None:
        self.modifier.apply(request.headers)
        return None


class ResponseHeaderModifier:
    def __init__(self, spec: Any, ctx: MatchContext) -> None:
        self.modifier = HeaderModifier(spec)

    def response(self, request: Request, response: Response) -> None:
        self.modifier.apply(response.headers)


def _path_modifier(spec: Any, what: str) -> tuple[str, str] | None:
    if spec is None:
        return None
    kinds = {"ReplaceFullPath": "replaceFullPath", "ReplacePrefixMatch": "replacePrefixMatch"}
    if not isinstance(spec, Mapping) or spec.get("type") not in kinds:
        raise ValueError(f'{what}: expected {{ type = "ReplaceFullPath"|"ReplacePrefixMatch", ... }}, got {spec!r}')
    value = spec.get(kinds[spec["type"]])
    if not isinstance(value, str) or not value.startswith("/") or set(spec) - {"type", kinds[spec["type"]]}:
        raise ValueError(f"{what}.{kinds[spec['type']]}: expected a path starting with '/', got {value!r}")
    return spec["type"], value


def _new_path(modifier: tuple[str, str], path: str, matched: RouteMatch) -> str:
    kind, value = modifier
    if kind == "ReplaceFullPath" or matched.path_type != "PathPrefix":
        return value
    prefix = matched.path_value.rstrip("/")
    rest = path[len(prefix):]
    return (value.rstrip("/") + rest) if rest else value


class URLRewrite:
    """`{ hostname, path = { type = "ReplacePrefixMatch", replacePrefixMatch } }`; ReplacePrefixMatch
    needs a PathPrefix match (as in HTTPRoute); with another path match it replaces the path."""

    def __init__(self, spec: Any, ctx: MatchContext) -> None:
        if not isinstance(spec, Mapping) or set(spec) - {"hostname", "path"}:
            raise ValueError(f"expected {{ hostname, path }}, got {spec!r}")
        hostname = spec.get("hostname")
        if hostname is not None and not isinstance(hostname, str):
            raise ValueError(f"hostname: expected a string, got {hostname!r}")
        self.hostname = hostname.encode("latin-1") if hostname else None
        self.path = _path_modifier(spec.get("path"), "path")

    def request(self, request: Request, matched: RouteMatch) -> Response | None:
        if self.hostname is not None:
            request.headers.set(b"host", self.hostname)
        if self.path is not None:
            path, sep, query = request.url.target.partition("?")
            url = request.url
            request.url = URL(url.scheme, url.host, url.port, _new_path(self.path, path, matched) + sep + query)
        return None


class RequestRedirect:
    """Answer locally with a redirect: `{ scheme, hostname, port, path, statusCode = 302 }`."""

    def __init__(self, spec: Any, ctx: MatchContext) -> None:
        if not isinstance(spec, Mapping) or set(spec) - {"scheme", "hostname", "port", "path", "statusCode"}:
            raise ValueError(f"expected {{ scheme, hostname, port, path, statusCode }}, got {spec!r}")
        self.status = spec.get("statusCode", 302)
        if self.status not in (301, 302, 303, 307, 308):
            raise ValueError(f"statusCode: expected 301, 302, 303, 307 or 308, got {self.status!r}")
        self.scheme = spec.get("scheme")
        self.hostname = spec.get("hostname")
        self.port = spec.get("port")
        for key, value in (("scheme", self.scheme), ("hostname", self.hostname)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key}: expected a string, got {value!r}")
        if self.port is not None and (isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536):
            raise ValueError(f"port: expected 1-65535, got {self.port!r}")
        self.path = _path_modifier(spec.get("path"), "path")

    def request(self, request: Request, matched: RouteMatch) -> Response | None:
        url = request.url
        path, sep, query = url.target.partition("?")
        if self.path is not None:
            path = _new_path(self.path, path, matched)
        authority = self.hostname or request.headers.get("host") or url.authority
        if self.port is not None:
            if self.hostname is None and not authority.endswith("]"):
                authority = authority.rpartition(":")[0] or authority
            authority = f"{authority}:{self.port}"
        scheme = self.scheme or url.scheme
        location = f"{scheme}://{authority}{path}{sep}{query}"
        return Response(self.status, [(b"location", location.encode("latin-1")), (b"content-length", b"0")], b"")


class RequestMirror:
    """A fire-and-forget copy of `percent` % of requests to another backend (Envoy's shadow:
    its Host gets `-shadow` appended). Only bodies held in full are mirrored; the copy runs in
    the mesh's task group, at most `MIRROR_CONCURRENCY` at once per mesh, and its answer,
    errors and latency are only counted."""

    def __init__(self, spec: Any, ctx: MatchContext) -> None:
        if not isinstance(spec, Mapping) or "backendRef" not in spec or set(spec) - {"backendRef", "percent"}:
            raise ValueError(f"expected {{ backendRef = {{ name, subset }}, percent }}, got {spec!r}")
        self.mesh = ctx.mesh
        self.backend = ctx.backend(spec["backendRef"])
        percent = spec.get("percent", 100)
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError(f"percent: expected 0-100, got {percent!r}")
        self.percent = float(percent)
        self.sent = self.completed = self.failed = self.dropped = 0
        import random  # with the first route that samples: not loaded at start

        self._draw = random.random

    def request(self, request: Request, matched: RouteMatch) -> Response | None:
        if self.percent < 100 and self._draw() * 100 >= self.percent:
            return None
        mesh = self.mesh
        group = mesh.task_group
        if group is None or not isinstance(request.stream, bytes) or mesh.mirrors_in_flight >= MIRROR_CONCURRENCY:
            self.dropped += 1
            return None
        copy = request.copy()
        copy.extensions = {}
        host = request.headers.get("host") or request.url.host
        copy.headers.set(b"host", f"{host}-shadow")
        mesh.mirrors_in_flight += 1
        self.sent += 1
        group.start_soon(self._send, copy)
        return None

    async def _send(self, request: Request) -> None:
        try:
            with anyio.move_on_after(_MIRROR_TIMEOUT):
                response = await self.backend.send(request)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                self.completed += 1
                return
            self.failed += 1
        except Exception:  # noqa: BLE001 - a mirror's failure never reaches anyone but its counter
            self.failed += 1
        finally:
            self.mesh.mirrors_in_flight -= 1

    def state(self) -> dict[str, Any]:
        return {
            "type": "RequestMirror",
            "backend": self.backend.name,
            "percent": self.percent,
            "sent": self.sent,
            "completed": self.completed,
            "failed": self.failed,
            "dropped": self.dropped,
        }


@hookimpl
def meshcore_route_filters() -> dict[str, Any]:
    return {
        "RequestHeaderModifier": RequestHeaderModifier,
        "ResponseHeaderModifier": ResponseHeaderModifier,
        "URLRewrite": URLRewrite,
        "RequestRedirect": RequestRedirect,
        "RequestMirror": RequestMirror,
    }

