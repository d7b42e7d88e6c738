"""`meshcore demo --scenario canary`: a canary release moved along by reloads.

Two versions of `orders` (v1, v2) run on loopback; a library-mode mesh routes by the config
of docs/routing.md: testers (`x-canary: always`) always reach v2, everyone else is split by
weight. The weights go 100/0 -> 90/10 -> 50/50 -> 0/100, each step a new config loaded while
the load keeps running (as a SIGHUP does for the sidecar); every second prints the split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio

from .._mesh import Mesh
from ._app import UpstreamServer

__all__ = ["STEPS", "canary_config", "run_canary"]

STEPS = ((100, 0), (90, 10), (50, 50), (0, 100))


def canary_config(v1: str, v2: str, weights: tuple[int, int]) -> dict[str, Any]:
    return {
        "services": {
            "orders": {
                "discovery": "static",
                "balancer": "demo-rotation",
                "static": {"endpoints": [
                    {"address": v1, "metadata": {"version": "v1"}},
                    {"address": v2, "metadata": {"version": "v2"}},
                ]},
                "subsets": {"v1": {"metadata": {"version": "v1"}}, "v2": {"metadata": {"version": "v2"}}},
                "routes": [
                    {"name": "testers", "matches": [{"headers": [{"name": "x-canary", "value": "always"}]}],
                     "backendRefs": [{"subset": "v2"}]},
                    {"name": "canary", "backendRefs": [
                        {"subset": "v1", "weight": weights[0]}, {"subset": "v2", "weight": weights[1]}]},
                ],
            }
        }
    }


async def run_canary(duration: float, rate: float, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the canary for `duration` seconds at `rate` requests/s; returns the split per step."""
    from ._scenario import _RotationPlugin

    v1, v2 = UpstreamServer("v1", record=False).start(), UpstreamServer("v2", record=False).start()
    plugins = [("demo-rotation", _RotationPlugin())]
    steps: list[dict[str, Any]] = []
    errors = 0
    try:
        out(f"orders v1 on {v1.address}, v2 on {v2.address}; testers (x-canary: always) pinned to v2")
        per_step = duration / len(STEPS)
        for weights in STEPS:
            seen: Counter[str] = Counter()
            testers: Counter[str] = Counter()
            async with Mesh(canary_config(v1.address, v2.address, weights), extra_plugins=plugins) as mesh:
                out(f"reload: canary weights v1={weights[0]} v2={weights[1]}")
                async with mesh.client() as client:
                    end = anyio.current_time() + per_step
                    n = 0
                    while anyio.current_time() < end:
                        tester = n % 20 == 0
                        try:
                            r = await client.get("http://orders/", headers={"x-canary": "always"} if tester else {})
                            (testers if tester else seen)[r.headers.get("x-upstream", "?")] += 1
                        except Exception:  # noqa: BLE001 - counted and shown, the demo goes on
                            errors += 1
                        n += 1
                        await anyio.sleep(1 / rate)
            total = sum(seen.values()) or 1
            share = {v: round(100 * seen[v] / total) for v in ("v1", "v2")}
            out(f"  split: v1 {share['v1']}%  v2 {share['v2']}%  ({total} requests)  "
                f"testers: {dict(testers)}")
            steps.append({"weights": weights, "share": share, "requests": total, "testers": dict(testers)})
    finally:
        v1.stop()
        v2.stop()
    out(f"canary done: {len(steps)} steps, {errors} client errors")
    return {"steps": steps, "errors": errors}
