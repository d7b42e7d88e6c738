"""The `meshcore` command, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys


def meshcore(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MESHCORE_PLUGINS", "MESHCORE_CONFIG")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "meshcore", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=60,
    )


CONFIG = """
[services.orders]
discovery = "static"
[services.orders.static]
endpoints = ["127.0.0.1:8001"]

[services.users]
discovery = "static"
[services.users.static]
endpoints = [{ address = "127.0.0.1:8101", weight = 2, zone = "a", tags = ["v2"] }]
"""


def test_plugins_lists_static_like_any_plugin():
    result = meshcore("plugins")
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if " static " in row)
    assert "meshcore" in line and "discovery" in line and "yes" in line


def test_check_config_prints_each_pipeline(tmp_path):
    (tmp_path / "mesh.toml").write_text(CONFIG)
    result = meshcore("check-config", "mesh.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "orders: static (1 endpoint) -> (single endpoint) -> []" in result.stdout
    assert "users: static (1 endpoint)" in result.stdout


def test_check_config_bad_input_exits_non_zero_naming_file_and_key(tmp_path):
    (tmp_path / "mesh.toml").write_text(CONFIG.replace('"127.0.0.1:8001"', '"127.0.0.1"'))
    result = meshcore("check-config", "mesh.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "mesh.toml: services.orders.static.endpoints: entry 0:" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_plugin_on_the_command_line(tmp_path):
    (tmp_path / "mesh.toml").write_text(CONFIG)
    result = meshcore("-p", "consull", "check-config", "mesh.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown plugin 'consull'; installed plugins:" in result.stderr
    assert "static" in result.stderr


def test_env_plugin_list_is_used(tmp_path):
    (tmp_path / "mesh.toml").write_text(CONFIG)
    result = meshcore("check-config", "mesh.toml", cwd=tmp_path, env={"MESHCORE_PLUGINS": "nope"})
    assert result.returncode == 2 and "unknown plugin 'nope'" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "mesh.toml").write_text("[mesh\n")
    plain = meshcore("check-config", "mesh.toml", cwd=tmp_path)
    debug = meshcore("--debug", "check-config", "mesh.toml", cwd=tmp_path)
    assert plain.returncode == 2 and "invalid TOML" in plain.stderr and "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr
