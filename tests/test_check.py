"""`meshcore check`: the core's lines (config, plugins, listeners, discovery), the lines plugins
add through `meshcore_checks`, exit codes and the JSON shape."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import meshcore
from meshcore._check import listener_checks, run_probes
from meshcore._sidecar._settings import parse_address


def meshcore_check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHCORE_PLUGINS", "MESHCORE_CONFIG")}
    return subprocess.run([sys.executable, "-m", "meshcore", "check", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=60, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def listening() -> Iterator[int]:
    """A port someone listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def write_config(tmp_path: Path, outbound: int, extra: str = "") -> Path:
    path = tmp_path / "mesh.toml"
    path.write_text(f"""
[sidecar]
outbound = "127.0.0.1:{outbound}"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:{free_port()}"

[services.orders]
discovery = "static"
[services.orders.static]
endpoints = ["127.0.0.1:8001"]
{extra}""")
    return path


def test_a_ready_config_passes_every_check(tmp_path: Path):
    port = free_port()
    write_config(tmp_path, port)
    result = meshcore_check(cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "✓ plugins: loaded: static, sidecar, demo, routing" in lines
    assert "✓ config mesh.toml: valid, 1 service" in lines
    assert f"✓ listener outbound 127.0.0.1:{port}: free" in lines
    assert "✓ listener inbound 127.0.0.1:0: port 0: a free port is picked at start" in lines
    assert "✓ discovery orders (static): 1 endpoint listed in the config" in lines
    assert lines[-1].startswith("all ") and lines[-1].endswith(" checks passed")
    assert not any(line.startswith("✗") for line in lines)


def test_a_taken_port_fails_with_the_fix(tmp_path: Path, listening: int):
    write_config(tmp_path, listening)
    result = meshcore_check(cwd=tmp_path)
    assert result.returncode == 1
    assert f"✗ listener outbound 127.0.0.1:{listening}: the port is in use" in result.stdout
    assert '    fix: stop the process listening there' in result.stdout
    assert '[sidecar] outbound = "host:port"' in result.stdout
    assert result.stdout.splitlines()[-1] == f"{result.stdout.count('✓') + 1} checks, 1 failed"
    skipped = meshcore_check("--no-listeners", cwd=tmp_path)
    assert skipped.returncode == 0 and "listener" not in skipped.stdout


def test_an_invalid_config_is_a_failed_line_naming_the_key(tmp_path: Path):
    write_config(tmp_path, 0, extra="[services.orders.nope]\n")
    result = meshcore_check(cwd=tmp_path)
    assert result.returncode == 1
    assert "✗ config mesh.toml: mesh.toml: services.orders.nope" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_missing_config_says_how_to_point_at_one(tmp_path: Path):
    result = meshcore_check("-c", "absent.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert "✗ config absent.toml: absent.toml: file not found" in result.stdout
    assert "fix: create it, or point -c/--config or MESHCORE_CONFIG at your config" in result.stdout


def test_an_unknown_plugin_is_a_failed_line(tmp_path: Path):
    write_config(tmp_path, 0)
    result = meshcore_check("-p", "nope", cwd=tmp_path)
    assert result.returncode == 1
    assert "✗ plugins: unknown plugin 'nope'; installed plugins:" in result.stdout


def test_output_json_shape(tmp_path: Path, listening: int):
    write_config(tmp_path, listening)
    result = meshcore_check("--output", "json", cwd=tmp_path)
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert all(set(c) == {"source", "title", "ok", "detail", "fix"} for c in data["checks"])
    failed = [c for c in data["checks"] if not c["ok"]]
    assert failed == [{
        "source": "core", "title": f"listener outbound 127.0.0.1:{listening}", "ok": False,
        "detail": "the port is in use", "fix": failed[0]["fix"],
    }]
    assert "[sidecar] outbound" in failed[0]["fix"]


def test_listener_checks_name_an_address_not_on_this_machine():
    [check] = listener_checks([("admin", parse_address("192.0.2.1:15000"))])
    assert not check.ok and check.detail == "the address is not one of this machine's"


# -- meshcore_checks: plugins contribute lines ---------------------------------------------------


class CertCheck:
    """A plugin whose meshcore_checks reads its own section of the config."""

    @meshcore.hookimpl
    def meshcore_checks(self, config: meshcore.MeshConfig) -> list[Any]:
        async def expiry() -> meshcore.Check:
            await anyio.lowlevel.checkpoint()
            return meshcore.Check("certificate a.crt", True, f"{len(config.services)} services")

        async def two() -> list[meshcore.Check]:
            return [meshcore.Check("agent", False, "unreachable", "start it"),
                    meshcore.Check("token", True)]

        return [expiry, two]


class Broken:
    @meshcore.hookimpl
    def meshcore_checks(self, config: meshcore.MeshConfig) -> list[Any]:
        async def boom() -> meshcore.Check:
            raise RuntimeError("bad probe")

        async def stuck() -> meshcore.Check:
            await anyio.Event().wait()
            raise AssertionError("unreachable")

        return [boom, stuck]


class Quiet:
    @meshcore.hookimpl
    def meshcore_checks(self, config: meshcore.MeshConfig) -> None:
        return None


def config() -> meshcore.MeshConfig:
    return meshcore.MeshConfig.from_dict(
        {"services": {"orders": {"discovery": "static", "static": {"endpoints": ["127.0.0.1:1"]}}}}
    )


@pytest.mark.anyio
async def test_plugins_contribute_check_lines_in_order():
    plugins = meshcore.Plugins(["static"], extra=[("certs", CertCheck()), ("quiet", Quiet())])
    probes = plugins.checks(config())
    assert [source for source, _ in probes] == ["certs", "certs"]
    results = await run_probes(probes)
    assert results == [
        ("certs", meshcore.Check("certificate a.crt", True, "1 services")),
        ("certs", meshcore.Check("agent", False, "unreachable", "start it")),
        ("certs", meshcore.Check("token", True)),
    ]


@pytest.mark.anyio
async def test_a_probe_that_raises_or_hangs_is_a_failed_line_naming_its_plugin():
    plugins = meshcore.Plugins(["static"], extra=[("broken", Broken()), ("certs", CertCheck())])
    results = await run_probes(plugins.checks(config()), timeout=0.2)
    by_title = {c.title: (source, c) for source, c in results}
    source, boom = results[0]
    assert source == "broken" and not boom.ok
    assert boom.detail == "RuntimeError: bad probe" and "plugin 'broken'" in boom.fix
    source, stuck = results[1]
    assert source == "broken" and not stuck.ok and "no answer within 0.2 s" in stuck.detail
    assert by_title["certificate a.crt"][1].ok  # the others still report


@pytest.mark.anyio
async def test_meshcore_checks_goes_through_pluggy_so_wrappers_apply():
    seen: list[str] = []

    class Wrapper:
        @meshcore.hookimpl(wrapper=True)
        def meshcore_checks(self, config: meshcore.MeshConfig) -> Any:
            result = yield
            seen.append("wrapped")
            return result

    plugins = meshcore.Plugins(["static"], extra=[("certs", CertCheck()), ("wrapper", Wrapper())])
    results = await run_probes(plugins.checks(config()))
    assert len(results) == 3 and seen


def test_a_check_hook_returning_a_coroutine_is_refused():
    class Async:
        @meshcore.hookimpl
        async def meshcore_checks(self, config: meshcore.MeshConfig) -> list[Any]:
            return []

    plugins = meshcore.Plugins(["static"], extra=[("async", Async())])
    with pytest.raises(meshcore.PluginError, match="plugin 'async': hook meshcore_checks returned an awaitable"):
        plugins.checks(config())
