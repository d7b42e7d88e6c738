"""The admin listener: /live, /ready, /metrics (Prometheus text), /state (JSON), / (dashboard)
and /dashboard.json (the dashboard's data, docs/dashboard.md).

Envoy's admin interface is the model (`/ready`, `/stats/prometheus`, `/clusters`,
`/config_dump`); like Envoy's it is unauthenticated, so it binds to loopback unless the config
says `admin_bind_any = true`. Only GET and HEAD are answered.

Binding to loopback does not stop a web page: DNS rebinding points the page's own host name at
127.0.0.1, and the browser then lets it read `/state`. The page's request still carries its
host name in `Host`, so only `localhost`, IP literals and the names in `admin_hosts` are
answered; any other `Host` gets 403 (the defence Kubernetes' and Consul's local APIs use, and
what the Chromium/Jupyter advisories on DNS rebinding recommend).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._models import Request, Response

if TYPE_CHECKING:
    from ._runtime import Sidecar

__all__ = ["admin_handler"]


def _text(status: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    data = body.encode() if isinstance(body, str) else body
    return Response(
        status,
        [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")],
        data,
    )


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether the admin listener answers a request for `host` (already without port and
    brackets): localhost, an IP literal, or a configured admin host."""
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost") or host in allowed:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def refuse(request: Request, allowed: Sequence[str]) -> Response | None:
    """The admin's answer to a request it will not serve (a DNS-rebinding `Host`, a method
    other than GET/HEAD), or None; shared with the workers' group admin."""
    if not host_allowed(request.url.host, allowed):
        return _text(
            403,
            f"forbidden: Host {request.url.host[:64]!r} is not localhost, an IP literal or "
            "one of [sidecar] admin_hosts (DNS rebinding guard)\n",
        )
    if request.method not in ("GET", "HEAD"):
        response = _text(405, "method not allowed\n")
        response.headers.append((b"allow", b"GET, HEAD"))
        return response
    return None


def admin_handler(sidecar: Sidecar) -> Any:
    async def handle(request: Request, info: Any) -> Response:
        refused = refuse(request, sidecar.settings.admin_hosts)
        if refused is not None:
            return refused
        path = request.url.path
        if path == "/live":
            return _text(200, "live\n")
        if path == "/ready":
            if sidecar.ready:
                return _text(200, "ready\n")
            why = "draining" if sidecar.draining else "waiting for the first discovery snapshot"
            return _text(503, f"not ready: {why}\n")
        if path in ("/metrics", "/stats/prometheus"):
            gen = sidecar.generation
            state = gen.mesh.state() if gen is not None else {}
            from ._exposition import render  # with the first scrape: not needed at start

            body = render(sidecar.telemetry, state, sidecar.stats())
            return _text(200, body, "text/plain; version=0.0.4; charset=utf-8")
        if path == "/state":
            import json  # with the first /state or /dashboard.json: not needed at start

            body = json.dumps(sidecar.state(), indent=2, default=str, sort_keys=True) + "\n"
            return _text(200, body, "application/json")
        if path == "/dashboard.json":
            import json

            from ._dashboard import dashboard  # with its first request: not needed at start

            with_peers = "peers=0" not in request.url.target.partition("?")[2].split("&")
            view = await dashboard(sidecar, with_peers)
            return _text(200, json.dumps(view, default=str) + "\n", "application/json")
        if path == "/":  # the live dashboard (dashboard.html), reading /dashboard.json
            from ._dashboard import page

            return _text(200, page(), "text/html; charset=utf-8")
        return _text(
            404, f"not found: {path} (try /live, /ready, /metrics, /state, /dashboard.json)\n"
        )

    return handle
