"""What the sidecar answers itself: every `x-meshcore-error` code is in docs/sidecar.md with its
status, and a layer's own refusal (`meshcore.LocalRefusal`) is a 503 with Retry-After."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshcore
from meshcore._endpoints import Endpoint
from meshcore._sidecar._answers import CODES
from meshcore.testing import raw_upstream

from .conftest import running_sidecar, sidecar_config, static_service, url

ROOT = Path(__file__).resolve().parents[2]
SIDECAR = ROOT / "meshcore" / "_sidecar"


def documented_codes() -> dict[str, int]:
    text = (ROOT / "docs" / "sidecar.md").read_text()
    table = text.split("### What the sidecar answers itself", 1)[1].split("\n\n", 2)[1]
    codes = {}
    for row in table.splitlines()[2:]:
        status, code = (cell.strip() for cell in row.strip("|").split("|")[:2])
        for name in re.findall(r"`([a-z_]+)`", code):
            codes[name] = int(status)
    return codes


def emitted_codes() -> set[str]:
    """Codes written in the sidecar's source: arguments of `Refused`, `answer` and
    `local_response`, what `classify` returns, and the names a direction renames codes to."""
    found: set[str] = set()
    for path in SIDECAR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if func in ("Refused", "answer", "local_response"):
                    found.update(
                        a.value for a in node.args
                        if isinstance(a, ast.Constant) and isinstance(a.value, str)
                        and re.fullmatch(r"[a-z]+(_[a-z]+)*", a.value)
                    )
            elif isinstance(node, ast.FunctionDef) and node.name == "classify":
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Tuple):
                        first = ret.value.elts[0]
                        if isinstance(first, ast.Constant):
                            found.add(first.value)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(getattr(t, "id", None) == "renamed" for t in targets) and isinstance(node.value, ast.Dict):
                    found.update(v.value for v in node.value.values if isinstance(v, ast.Constant))
    return found


def test_docs_table_lists_every_code_with_its_status():
    assert documented_codes() == CODES


def test_every_code_the_source_emits_is_in_the_table():
    emitted = emitted_codes()
    assert {"no_route", "denied", "app_unreachable", "local_refusal", "internal"} <= emitted
    assert emitted <= set(CODES), f"codes sent but not in CODES/docs: {emitted - set(CODES)}"


class Refuser:
    """A layer with a concurrency limit of zero: it refuses every request itself."""

    def __init__(self, retry_after: float | None) -> None:
        self.retry_after = retry_after

    @meshcore.hookimpl
    def meshcore_kinds(self) -> list[meshcore.Kind]:
        return [meshcore.Kind("refuser", "layer")]

    @meshcore.hookimpl
    def meshcore_layer(self, kind: str, settings: Any, upstream: meshcore.Upstream) -> Any:
        if kind != "refuser":
            return None

        def layer(inner: meshcore.Service) -> meshcore.Service:
            async def service(request: meshcore.Request) -> meshcore.Response:
                raise meshcore.LocalRefusal(
                    "concurrency limit 0 reached", service=upstream.name, retry_after=self.retry_after
                )

            return service

        return layer


@pytest.mark.anyio
@pytest.mark.parametrize("retry_after, header", [(2.4, "2"), (None, None)])
async def test_a_layers_local_refusal_is_a_503_with_retry_after(upstream, retry_after, header):
    config = sidecar_config({"orders": {**static_service([upstream()]), "resilience": ["refuser"]}})
    async with running_sidecar(config, extra_plugins=[("refuser", Refuser(retry_after))]) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
    assert (r.status_code, r.headers["x-meshcore-error"]) == (503, "local_refusal")
    assert r.headers.get("retry-after") == header
    assert "concurrency limit 0 reached" in r.text
    assert sidecar.telemetry.local_errors[("outbound", "orders", "local_refusal")] == 1


@pytest.mark.anyio
async def test_library_mode_raises_the_local_refusal_as_an_httpx_error(upstream):
    config = {"services": {"orders": {**static_service([upstream()]), "resilience": ["refuser"]}}}
    async with meshcore.Mesh(config, [], extra_plugins=[("refuser", Refuser(1.0))]) as mesh:
        async with mesh.client() as client:
            with pytest.raises(httpx.HTTPError) as info:
                await client.get("http://orders/")
    assert isinstance(info.value, meshcore.LocalRefusal)
    assert info.value.retry_after == 1.0


@pytest.mark.anyio
@pytest.mark.parametrize("many", [False, True], ids=["2MB-header", "10k-headers"])
async def test_an_upstreams_oversized_response_head_is_a_502(many: bool) -> None:
    if many:
        fields = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    else:
        fields = b"X-Big: " + b"a" * (2 << 20) + b"\r\n"
    response = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"
    with raw_upstream(response) as port:
        endpoint = f"127.0.0.1:{port}"
        config = sidecar_config({"orders": static_service([endpoint])})
        async with running_sidecar(config) as sidecar:
            async with httpx.AsyncClient() as client:
                r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
            stats = sidecar.telemetry.local_errors
            counted = sidecar.generation.mesh.upstream("orders").stats[Endpoint.parse(endpoint)]
    assert (r.status_code, r.headers["x-meshcore-error"]) == (502, "upstream_head_too_large")
    assert "response head from" in r.text and "exceeds the limits" in r.text
    assert stats[("outbound", "orders", "upstream_head_too_large")] == 1
    assert (counted.requests, counted.failures) == (1, 1)  # a failure of the endpoint
