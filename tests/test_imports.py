"""What loads what: the CLI and the sidecar never import httpx, `meshcore --help` not the engine.

A typical sidecar (round-robin, retry, breaker) also starts without the modules that made its
start slow and its idle RSS large (docs/data-path.md, "Start-up time and idle memory"): none is
needed before the first request, and a change that brings one back fails here.

httpx costs most of `import meshcore` (about 100 ms, with its own CLI when click and rich are
installed), and the sidecar never builds an httpx object; library mode loads it with the first
client. Each check runs in a fresh interpreter; `-X importtime` lists every module a real
`meshcore` process imported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from meshcore.testing import free_port

MESHCORE = str(Path(sys.executable).with_name("meshcore"))


def imported(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return set(out.split())


def importtime_modules(stderr: str) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_import_meshcore_and_the_sidecar_do_not_import_httpx():
    modules = imported(
        "import meshcore, meshcore._sidecar._runtime, meshcore._sidecar._supervisor, meshcore._cli"
    )
    assert "meshcore._sidecar._runtime" in modules
    assert "meshcore._sidecar._supervisor" in modules  # `--workers N`: the supervisor too
    assert "httpx" not in modules


def test_library_mode_loads_httpx_with_its_names():
    modules = imported(
        "import meshcore, httpx\n"
        "assert issubclass(meshcore.MeshTransport, httpx.AsyncBaseTransport)\n"
        "assert 'MeshTransport' in meshcore.__all__"
    )
    assert "meshcore._transport" in modules
    with pytest.raises(subprocess.CalledProcessError):
        imported("import meshcore; meshcore.NoSuchName")


def test_meshcore_help_imports_neither_the_engine_nor_httpx():
    done = subprocess.run(
        [MESHCORE, "--help"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "MESHCORE_PLUGINS": ""},
    )
    assert done.returncode == 0 and "run" in done.stdout
    modules = importtime_modules(done.stderr)
    assert "meshcore._cli" in modules
    assert not {m for m in modules if m.startswith(("meshcore._http", "httpx"))}


def test_meshcore_run_serves_without_importing_httpx(tmp_path, upstream):
    server = upstream()
    ports = {name: free_port() for name in ("outbound", "inbound", "admin")}
    config = tmp_path / "mesh.toml"
    config.write_text(
        "[sidecar]\n"
        + "".join(f'{name} = "127.0.0.1:{port}"\n' for name, port in ports.items())
        + f'[services.orders]\ndiscovery = "static"\n[services.orders.static]\nendpoints = ["{server.address}"]\n'
    )
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [MESHCORE, "-c", str(config), "run", "--backend", "asyncio"],
            stderr=err, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "MESHCORE_PLUGINS": ""},
        )
        try:
            deadline = time.monotonic() + 30
            while "ready to accept" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "not ready in 30 s"
                time.sleep(0.05)
            outbound = f"http://127.0.0.1:{ports['outbound']}/"
            # A proxied request, an answer of the sidecar's own, and the admin API.
            assert httpx.get(outbound, headers={"host": "orders"}).status_code == 200
            assert httpx.get(outbound, headers={"host": "nowhere"}).status_code == 404
            assert httpx.get(f"http://127.0.0.1:{ports['admin']}/metrics").status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    modules = importtime_modules(log.read_text())
    assert "meshcore._sidecar._handlers" in modules and "meshcore._http._server" in modules
    assert not {m for m in modules if m.startswith("httpx")}


# Packages a sidecar without the tls plugin must not import by the time it is ready: httpx and
# its dependencies (library mode only), rich (tables of `meshcore plugins`), importlib.metadata
# and the email package (entry points are read directly), importlib.resources (the dashboard
# page, read on its first request), the demo's scenario, cryptography (the tls plugin's); click
# and what it brings (uuid, platform, gettext, difflib), the click CLI and the demo command
# (a plain `meshcore run` is parsed by `meshcore._main`); the native client and `Check`
# (lazy exports of `meshcore`); the dashboard and json (with the first request for a page or
# JSON document of the admin listener); the Prometheus rendering and `resource` (the first
# scrape), `--workers N`'s modules, and `random` (a retry's or a route's first draw; the
# round-robin start offset comes from os.urandom).
NOT_AT_START = (
    "httpx", "httpcore", "h11", "certifi", "idna", "rich", "importlib.metadata", "email",
    "importlib.resources", "meshcore._demo._scenario", "meshcore._transport", "cryptography",
    "click", "uuid", "platform", "gettext", "difflib", "meshcore._cli", "meshcore._demo._cli",
    "meshcore._sidecar._cli", "meshcore._client", "meshcore._check", "meshcore._sidecar._dashboard",
    "json", "meshcore._sidecar._exposition", "resource", "meshcore._sidecar._workers",
    "meshcore._sidecar._supervisor", "random",
)


def test_a_typical_sidecar_starts_without_library_mode_rich_or_metadata(tmp_path, upstream):
    server = upstream()
    ports = {name: free_port() for name in ("outbound", "inbound", "admin")}
    config = tmp_path / "mesh.toml"
    config.write_text(
        '[mesh]\nplugins = ["round-robin", "retry", "breaker"]\n'
        '[defaults]\nbalancer = "round-robin"\nresilience = ["retry", "breaker"]\n[sidecar]\n'
        + "".join(f'{name} = "127.0.0.1:{port}"\n' for name, port in ports.items())
        + f'[services.orders]\ndiscovery = "static"\n[services.orders.static]\n'
        f'endpoints = ["{server.address}", "{server.address}"]\n'
    )
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        # The default backend, as `meshcore run` starts in production.
        proc = subprocess.Popen(
            [MESHCORE, "-c", str(config), "run"],
            stderr=err, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
        )
        try:
            deadline = time.monotonic() + 30
            while "ready to accept" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "not ready in 30 s"
                time.sleep(0.05)
            at_start = importtime_modules(log.read_text())
            # No resolver thread pool: the listeners on IP addresses bind without a lookup.
            assert len(os.listdir(f"/proc/{proc.pid}/task")) == 1
            outbound = f"http://127.0.0.1:{ports['outbound']}/"
            assert httpx.get(outbound, headers={"host": "orders"}).status_code == 200
            page = httpx.get(f"http://127.0.0.1:{ports['admin']}/")
            assert page.status_code == 200 and b"<html" in page.content.lower()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # (-X importtime lists modules imported by an import statement: the plugins' submodules)
    assert {"meshcore_retry._retry", "meshcore_breaker._layer"} <= at_start
    assert not {m for m in at_start if m.startswith(NOT_AT_START)}
    assert "http" not in at_start  # http.HTTPStatus: the engine writes its phrases out
    assert "importlib.resources" in importtime_modules(log.read_text())  # the page was served
