"""The dashboard: the page at `/` and the JSON behind it at `/dashboard.json`.

The page is one static HTML file with its CSS and JavaScript inline (no build step, no external
assets, so it works offline and behind any proxy); it reads `/dashboard.json` every two
seconds. Read once and cached: the admin handler calls `page()` per request.

`/dashboard.json` is what an operator opens first (the anchors are Linkerd viz's `stat`/`top`/
`edges`, Consul UI's service and instance views and Kiali's graph): every service this sidecar
serves outbound and inbound with its rate, success rate, latency quantiles, retries, ejections
and breaker state now and over the last 15 minutes (`_history`), each endpoint likewise with
its live stats, inbound callers by identity, certificates and discovery freshness, and a
topology of who calls whom, merged from the same JSON of the peer sidecars named in
`[sidecar] admin_peers` or found in discovery (an endpoint whose metadata has `admin`).

Peers are fetched server-side (the page stays same-origin, and a browser is never pointed at
another admin listener), each with `admin_peer_timeout`, all at once, at most MAX_PEERS, the
answer cached for PEER_CACHE seconds so a page left open on every sidecar does not multiply
into a storm; a peer that does not answer is shown as down with the reason. A peer is asked
for `/dashboard.json?peers=0`, its own view only, so peers listing each other do not recurse.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import anyio

from .._endpoints import Endpoint
from .._errors import MeshError
from .._http import HTTPConnector, PoolLimits, Timeouts
from .._models import Request
from ._exposition import _find_expiry
from ._settings import parse_address

if TYPE_CHECKING:
    from ._runtime import Sidecar
    from ._settings import Address

__all__ = ["dashboard", "page", "workload"]

MAX_PEERS = 32
# A peer's view with every bound of `_history` full is about 5 MB of JSON; an answer past this
# is not a meshcore peer's, and is not held in memory.
MAX_PEER_BYTES = 16 * 1024 * 1024
PEER_CACHE = 1.0  # seconds; below the page's two-second refresh
VERSION = 1


@cache
def page() -> bytes:
    # Imported on the first request for the page: importlib.resources brings tempfile, shutil
    # and the compression modules, ~10 ms and memory every sidecar would pay at start.
    from importlib.resources import files

    return files(__package__).joinpath("dashboard.html").read_bytes()


def workload(identity: str) -> str:
    """A caller's or server's name for the topology: the service account of a SPIFFE id
    (`spiffe://td/ns/default/sa/web` -> `web`), the identity itself otherwise."""
    if not identity:
        return "(no identity)"
    if identity == "overflow":
        return "(other callers)"
    if identity.startswith("spiffe://") and "/sa/" in identity:
        return identity.rsplit("/sa/", 1)[1] or identity
    return identity


def _breaker(
    telemetry_states: Mapping[tuple[str, str, str], str], service: str, state: Mapping[str, Any]
) -> str | None:
    """The circuit's state: the breaker plugin's own (`closed` before any change), else the
    last `meshcore_state_changed` event a breaker of another plugin fired."""
    breaker = state.get("breaker")
    circuit = breaker.get("circuit") if isinstance(breaker, dict) else None
    own = circuit.get("state") if isinstance(circuit, dict) else None
    if isinstance(own, str):
        return own
    return telemetry_states.get((service, "breaker", service))


def _certificates(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Workload certificates from the security plugins' state (the tls plugin's `expires_at`),
    found the same way /metrics finds them for identity_cert_expiration_timestamp_seconds."""
    now = time.time()
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for plugin, tree in state.get("state", {}).items():
        for identity, expiry in _find_expiry(tree):
            info = {
                "plugin": plugin, "identity": identity, "expires_at": expiry,
                "seconds_left": round(expiry - now, 3),
            }
            if isinstance(tree, dict):
                for key in ("not_after", "serial", "mode", "rotations"):
                    if key in tree:
                        info[key] = tree[key]
            out[(identity, expiry)] = info
    return sorted(out.values(), key=lambda c: c["expires_at"])


def local_view(sidecar: Sidecar, state: Mapping[str, Any]) -> dict[str, Any]:
    """This sidecar's part of /dashboard.json (everything but `peers` and the merged topology);
    `state` is its `mesh.state()`."""
    gen = sidecar.generation
    services_state: dict[str, Any] = state.get("services", {})
    telemetry, history = sidecar.telemetry, sidecar.history
    clock = anyio.current_time()
    current = history.cumulative(telemetry, services_state)
    me = gen.service if gen is not None else (sidecar.settings.service or "local")
    certificates = _certificates(state)
    identity = certificates[0]["identity"] if certificates else ""

    services: list[dict[str, Any]] = []
    keys = set(current["services"]) | {("outbound", name) for name in services_state}
    if gen is not None:
        keys.add(("inbound", me))
    for direction, name in sorted(keys):
        s = services_state.get(name, {}) if direction == "outbound" else {}
        cum = current["services"].get((direction, name))
        row: dict[str, Any] = {
            "direction": direction,
            "service": name,
            "requests": int(cum[0]) if cum is not None else 0,
            "failures": int(cum[1]) if cum is not None else 0,
            "retries": int(cum[2]) if cum is not None else 0,
            "ejections": int(cum[3]) if cum is not None else 0,
            **history.view("services", (direction, name), current, clock),
        }
        if direction == "outbound":
            endpoints = s.get("endpoints", ())
            peer, tls = telemetry.server_peers.get(name, ("", "false"))
            row.update({
                "breaker": _breaker(telemetry.states, name, s),
                "endpoints": len(endpoints),
                "ejected": sum(1 for ep in endpoints if ep.get("ejected")),
                "configured": name in services_state,
                "peer_identity": peer,
                "tls": tls == "true",
                "balancer": s.get("balancer"),
                "resilience": s.get("resilience", []),
            })
            retry = s.get("retry")
            if isinstance(retry, dict) and "budget" in retry:
                row["retry_budget"] = retry["budget"]
        else:
            row.update({"breaker": None, "configured": True, "identity": identity,
                        "app": str(sidecar.settings.app)})
        services.append(row)

    endpoints_out: list[dict[str, Any]] = []
    for name, s in sorted(services_state.items()):
        for ep in s.get("endpoints", ()):
            cum = current["endpoints"].get((name, ep["id"]))
            meta = ep.get("metadata") or {}
            endpoints_out.append({
                "service": name,
                "endpoint": ep["id"],
                "instance": meta.get("instance", ""),
                "admin": meta["admin"] if isinstance(meta.get("admin"), str) else "",
                "zone": ep.get("zone"),
                "weight": ep.get("weight"),
                "requests": int(cum[0]) if cum is not None else 0,
                "failures": int(cum[1]) if cum is not None else 0,
                "in_flight": ep.get("in_flight", 0),
                "consecutive_failures": ep.get("consecutive_failures", 0),
                "latency_ewma_ms": ep.get("latency_ewma_ms"),
                "ejected": bool(ep.get("ejected")),
                "times_ejected": ep.get("times_ejected", 0),
                **history.view("endpoints", (name, ep["id"]), current, clock),
            })

    callers: list[dict[str, Any]] = []
    peer_tls = {(svc, peer): tls for (d, svc, _c, peer, tls) in telemetry.requests if d == "inbound"}
    for (name, peer), cum in sorted(current["callers"].items()):
        callers.append({
            "service": name,
            "identity": peer,
            "workload": workload(peer),
            "tls": peer_tls.get((name, peer)) == "true",
            "requests": int(cum[0]),
            "failures": int(cum[1]),
            **history.view("callers", (name, peer), current, clock),
        })

    discovery = []
    for name, s in sorted(services_state.items()):
        d = s.get("discovery", {})
        discovery.append({"service": name, **d})

    sc = sidecar.stats()
    return {
        "version": VERSION,
        "time": sc["time"],
        "bucket_seconds": history.width,
        "points": history.points,
        "sidecar": {
            "service": me,
            "identity": identity,
            "ready": sc["ready"],
            "draining": sc["draining"],
            "generation": sc["generation"],
            "uptime": sc["uptime"],
            "in_flight": sc["in_flight"],
            "listeners": sc["listeners"],
            "plugins": state.get("plugins", []),
            "warnings": sc["warnings"],
            "history_bytes": history.nbytes(),
            "history_dropped": history.dropped,
        },
        "services": services,
        "endpoints": endpoints_out,
        "callers": callers,
        "certificates": certificates,
        "discovery": discovery,
        "edges": _edges(me, services, callers),
    }


def _edges(me: str, services: Sequence[Mapping[str, Any]], callers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Who calls whom as this sidecar saw it: itself to each outbound service it sent to, each
    inbound caller (by identity) to itself."""
    edges = []
    for s in services:
        if s["direction"] == "outbound" and s["requests"] and s["service"] != "unknown":
            edges.append({
                "source": me, "target": s["service"], "requests": s["requests"],
                "rps": s["rps"], "success_rate": s["success_rate"], "p99": s["p99"],
                "tls": s.get("tls", False), "identity": s.get("peer_identity", ""),
                "seen_by": me, "side": "client",
            })
    for c in callers:
        edges.append({
            "source": c["workload"], "target": me, "requests": c["requests"], "rps": c["rps"],
            "success_rate": c["success_rate"], "p99": None, "tls": c["tls"],
            "identity": c["identity"], "seen_by": me, "side": "server",
        })
    return edges


def peer_addresses(
    configured: Sequence[Address], own: str, endpoints: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str]]:
    """(host:port, where it came from): `admin_peers`, then endpoints' `admin` metadata."""
    seen: dict[str, str] = {}
    for address in configured:
        seen.setdefault(str(address), "config")
    for ep in endpoints:
        if ep.get("admin"):
            seen.setdefault(ep["admin"], "discovery")
    seen.pop(own, None)
    return list(seen.items())[:MAX_PEERS]


async def _fetch_peer(connector: HTTPConnector, address: str, source: str, timeout: float) -> dict[str, Any]:
    base = {"address": address, "source": source}
    try:
        at = parse_address(address)
        request = Request("GET", f"http://{address}/dashboard.json?peers=0",
                          [(b"host", address.encode("ascii", "replace"))])
        with anyio.fail_after(timeout):
            response = await connector.send(Endpoint(at.host, at.port), request)
            try:
                if response.status_code != 200:
                    return {**base, "state": "down", "error": f"answered {response.status_code}"}
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_PEER_BYTES:
                        return {**base, "state": "down",
                                "error": f"answer larger than {MAX_PEER_BYTES} bytes"}
            finally:
                await response.aclose()
        view = json.loads(body)
        if not isinstance(view, dict) or view.get("version") != VERSION:
            return {**base, "state": "down", "error": "not a meshcore dashboard.json (version 1)"}
    except TimeoutError:
        return {**base, "state": "down", "error": f"no answer within {timeout:g} s"}
    except (MeshError, OSError, ValueError) as exc:
        return {**base, "state": "down", "error": f"{type(exc).__name__}: {exc}"[:200]}
    return {**base, "state": "up", "view": view}


class Peers:
    """The peer views, fetched at most once per PEER_CACHE seconds whoever asks."""

    def __init__(self) -> None:
        self._cached: list[dict[str, Any]] = []
        self._at: float | None = None
        self._lock: anyio.Lock | None = None

    async def get(self, addresses: Sequence[tuple[str, str]], timeout: float) -> list[dict[str, Any]]:
        if not addresses:
            return []
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            now = anyio.current_time()
            if self._at is not None and now - self._at < PEER_CACHE and [
                p["address"] for p in self._cached
            ] == [a for a, _ in addresses]:
                return self._cached
            results: list[dict[str, Any]] = [{} for _ in addresses]
            # meshcore's own client (the sidecar does not load httpx): one connection per peer
            connector = HTTPConnector(
                limits=PoolLimits(max_connections=1, max_idle=0),
                timeouts=Timeouts(connect=timeout, read=timeout, write=timeout, pool=timeout),
            )
            async with connector:

                async def one(i: int, address: str, source: str) -> None:
                    results[i] = await _fetch_peer(connector, address, source, timeout)

                async with anyio.create_task_group() as tg:
                    for i, (address, source) in enumerate(addresses):
                        tg.start_soon(one, i, address, source)
            self._cached, self._at = results, anyio.current_time()
            return results


def _merge_topology(local: Mapping[str, Any], peers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Nodes and edges across this sidecar and its peers. An edge both ends report (a client's
    outbound and a server's inbound) keeps the client's figures, as Linkerd viz's `edges`
    shows the client's view, and says both saw it."""
    me = local["sidecar"]["service"]
    nodes: dict[str, dict[str, Any]] = {me: {"id": me, "kind": "self", "state": "up"}}
    views = [local] + [p["view"] for p in peers if p.get("state") == "up"]
    for p in peers:
        if p.get("state") == "up":
            name = p["view"]["sidecar"]["service"]
            nodes.setdefault(name, {"id": name, "kind": "sidecar", "state": "up", "admin": p["address"]})
            nodes[name].setdefault("admin", p["address"])
        else:
            nodes[p["address"]] = {"id": p["address"], "kind": "sidecar", "state": "down",
                                   "admin": p["address"], "error": p.get("error", "")}
    edges: dict[tuple[str, str], dict[str, Any]] = {}
    for view in views:
        for e in view.get("edges", ()):
            key = (e["source"], e["target"])
            for end in key:
                nodes.setdefault(end, {"id": end, "kind": "workload", "state": "unknown"})
            old = edges.get(key)
            if old is None:
                edges[key] = {**e, "seen_by": [e["seen_by"]]}
            else:
                seen = sorted({*old["seen_by"], e["seen_by"]})
                if e["side"] == "client" and old["side"] != "client":
                    edges[key] = {**e, "seen_by": seen}
                else:
                    old["seen_by"] = seen
    return {"nodes": sorted(nodes.values(), key=lambda n: n["id"]),
            "edges": sorted(edges.values(), key=lambda e: (e["source"], e["target"]))}


async def dashboard(sidecar: Sidecar, with_peers: bool = True) -> dict[str, Any]:
    """The whole /dashboard.json (with_peers=False: what a peer asks for, this sidecar only)."""
    gen = sidecar.generation
    state = gen.mesh.state() if gen is not None else {}
    view = local_view(sidecar, state)
    if with_peers:
        settings = sidecar.settings
        own = str(sidecar.addresses.get("admin", ""))
        await add_peers(view, sidecar.peers, settings.admin_peers, own, settings.admin_peer_timeout)
    return view


async def add_peers(
    view: dict[str, Any], peers: Peers, configured: Sequence[Address], own: str, timeout: float
) -> None:
    """Fetch the peers (cached) and add `peers` and the merged `topology` to `view`."""
    answers = await peers.get(peer_addresses(configured, own, view["endpoints"]), timeout)
    view["peers"] = [
        {k: v for k, v in p.items() if k != "view"} | (_peer_summary(p["view"]) if "view" in p else {})
        for p in answers
    ]
    view["topology"] = _merge_topology(view, answers)


def _peer_summary(view: Mapping[str, Any]) -> dict[str, Any]:
    """What the page shows of a peer: its name, readiness, inbound figures and certificates."""
    sc = view.get("sidecar", {})
    inbound = [s for s in view.get("services", ()) if s.get("direction") == "inbound"]
    certs = view.get("certificates", ())
    return {
        "service": sc.get("service"),
        "identity": sc.get("identity"),
        "ready": sc.get("ready"),
        "inbound": [
            {k: s.get(k) for k in ("service", "requests", "rps", "success_rate", "p50", "p95", "p99")}
            for s in inbound
        ],
        "outbound": sorted(
            s["service"] for s in view.get("services", ()) if s.get("direction") == "outbound"
        ),
        "certificate_seconds_left": min((c["seconds_left"] for c in certs), default=None),
    }


# -- a group of workers (`meshcore run --workers N`) -------------------------------------------

_SUMMED = ("requests", "failures", "retries", "ejections", "rps", "in_flight", "times_ejected")
_COUNTS = ("requests", "failures", "retries", "ejections")
_QUANTILES = ("p50", "p95", "p99")


def _merge_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from the same row of each worker: counts and rates summed, the success rate
    weighted by each worker's rate, quantiles the highest of the workers' (an upper bound: the
    workers' histograms are not in the view), stats as the worst worker says."""
    out = dict(rows[0])
    for key in _SUMMED:
        if key in out:
            out[key] = sum(r.get(key) or 0 for r in rows)
    weighted = [(r["rps"], r["success_rate"]) for r in rows if r.get("success_rate") is not None]
    total = sum(w for w, _ in weighted)
    out["success_rate"] = (
        round(sum(w * v for w, v in weighted) / total, 4) if total
        else weighted[0][1] if weighted else None
    )
    for key in _QUANTILES:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = max(values) if values else None
    if "ejected" in out:
        out["ejected"] = any(r.get("ejected") for r in rows) if isinstance(out["ejected"], bool) \
            else sum(r.get("ejected") or 0 for r in rows)
    if "consecutive_failures" in out:
        out["consecutive_failures"] = max(r.get("consecutive_failures") or 0 for r in rows)
    series: dict[str, list[float | None]] = {}
    for field in (*_COUNTS, *_QUANTILES):
        columns = [r.get("series", {}).get(field) for r in rows]
        columns = [c for c in columns if c]
        if not columns:
            continue
        length = max(len(c) for c in columns)
        merged: list[float | None] = []
        for i in range(-length, 0):  # aligned on the newest point: workers tick on their own
            values = [c[i] for c in columns if len(c) >= -i and c[i] is not None]
            if field in _COUNTS:
                merged.append(sum(values))
            else:
                merged.append(max(values) if values else None)
        series[field] = merged
    out["series"] = series
    return out


def merge_views(views: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The group's /dashboard.json (without peers) from each worker's `?peers=0` view."""
    up = [v for v in views if v is not None]
    if not up:
        return {"version": VERSION, "time": time.time(), "bucket_seconds": 0, "points": 0,
                "sidecar": {"service": "", "ready": False, "workers": len(views), "workers_up": 0},
                "services": [], "endpoints": [], "callers": [], "certificates": [],
                "discovery": [], "edges": []}
    first = up[0]

    def merged(kind: str, key: Callable[[Mapping[str, Any]], tuple[str, ...]]) -> list[dict[str, Any]]:
        groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for view in up:
            for row in view.get(kind, ()):
                groups.setdefault(key(row), []).append(row)
        return [_merge_rows(rows) for _, rows in sorted(groups.items())]

    services = merged("services", lambda r: (r["direction"], r["service"]))
    callers = merged("callers", lambda r: (r["service"], r["identity"]))
    sc = dict(first["sidecar"])
    sc.update({
        "ready": all(v["sidecar"].get("ready") for v in up) and len(up) == len(views),
        "in_flight": sum(v["sidecar"].get("in_flight", 0) for v in up),
        "history_bytes": sum(v["sidecar"].get("history_bytes", 0) for v in up),
        "history_dropped": sum(v["sidecar"].get("history_dropped", 0) for v in up),
        "workers": len(views),
        "workers_up": len(up),
    })
    certificates = {(c["identity"], c["expires_at"]): c for v in up for c in v.get("certificates", ())}
    return {
        **{k: first[k] for k in ("version", "time", "bucket_seconds", "points")},
        "sidecar": sc,
        "services": services,
        "endpoints": merged("endpoints", lambda r: (r["service"], r["endpoint"])),
        "callers": callers,
        "certificates": sorted(certificates.values(), key=lambda c: c["expires_at"]),
        "discovery": first.get("discovery", []),
        "edges": _edges(sc["service"], services, callers),
    }
