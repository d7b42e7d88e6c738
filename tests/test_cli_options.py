"""`-c/--config` and `-p/--plugin` on every subcommand, the plugin that provides an unknown
subcommand, `--output json`, and shell completion — the `meshcore` command as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import meshcore
from meshcore._cli import declared_commands, scan_plugin_options, shared_options

SCRIPT = Path(sys.executable).with_name("meshcore")  # the installed console script

CONFIG = """
[services.orders]
discovery = "static"
resilience = ["retry", "breaker"]
[services.orders.static]
endpoints = ["127.0.0.1:8001"]
"""


def meshcore_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                 script: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MESHCORE_PLUGINS", "MESHCORE_CONFIG")}
    full_env.update(env or {})
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "meshcore"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=60, check=False)


def needs(*plugins: str) -> None:
    missing = [p for p in plugins if p not in meshcore.installed_plugins()]
    if missing:
        pytest.skip(f"needs the {', '.join(missing)} plugin(s) installed (requirements-dev.txt)")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "mesh.toml").write_text(CONFIG)
    return tmp_path / "mesh.toml"


def test_run_accepts_config_and_plugin_after_the_subcommand(tmp_path: Path):
    """What docs/sidecar.md opens with: the config named after `run` is the one read."""
    needs("retry")
    (tmp_path / "other.toml").write_text("[sidecar]\noutbound = \"nowhere\"\n")
    result = meshcore_cli("run", "--config", "other.toml", "--plugin", "retry", cwd=tmp_path)
    assert "No such option" not in result.stderr
    assert result.returncode == 2
    assert "other.toml: sidecar.outbound:" in result.stderr


def test_plugin_after_the_subcommand_loads_it(config: Path):
    needs("retry", "breaker")
    without = meshcore_cli("check-config", cwd=config.parent)
    assert without.returncode == 2 and "'retry'" in without.stderr
    result = meshcore_cli("check-config", "-p", "retry", "--plugin", "breaker", cwd=config.parent)
    assert result.returncode == 0, result.stderr
    assert "orders: static (1 endpoint) -> (single endpoint) -> [retry, breaker]" in result.stdout


def test_plugins_before_and_after_the_subcommand_accumulate(config: Path):
    needs("retry", "breaker")
    result = meshcore_cli("-p", "retry", "check-config", "-p", "breaker", cwd=config.parent)
    assert result.returncode == 0, result.stderr
    assert "plugins: static, sidecar, demo, routing, retry, breaker" in result.stdout


def test_the_subcommand_config_wins_over_the_group_and_the_environment(config: Path):
    needs("retry", "breaker")
    (config.parent / "broken.toml").write_text("[mesh\n")
    args = ("-p", "retry", "-p", "breaker")
    result = meshcore_cli("-c", "broken.toml", "check-config", "-c", "mesh.toml", *args,
                          cwd=config.parent, env={"MESHCORE_CONFIG": "broken.toml"})
    assert result.returncode == 0, result.stderr
    assert "mesh.toml: ok" in result.stdout
    from_env = meshcore_cli("check-config", *args, cwd=config.parent,
                            env={"MESHCORE_CONFIG": "broken.toml"})
    assert from_env.returncode == 2 and "broken.toml" in from_env.stderr


def test_command_line_plugins_win_over_the_environment(config: Path):
    needs("retry", "breaker")
    result = meshcore_cli("check-config", "-p", "retry", "-p", "breaker", cwd=config.parent,
                          env={"MESHCORE_PLUGINS": "nope"})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args, command",
    [
        (("registry", "-p", "consul", "--help"), "meshcore registry"),
        (("registry", "--plugin=consul", "--help"), "meshcore registry"),
        (("ca", "init", "-p", "tls", "--help"), "meshcore ca init"),
        (("ca", "-p", "tls", "issue", "--help"), "meshcore ca issue"),
    ],
)
def test_plugin_commands_take_the_options_too(args: tuple[str, ...], command: str):
    needs("consul", "tls")
    result = meshcore_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"Usage: {command}" in result.stdout
    assert "-p, --plugin NAME" in result.stdout and "-c, --config FILE" in result.stdout


def test_a_plugin_command_runs_with_the_plugin_named_after_it(tmp_path: Path):
    needs("tls")
    result = meshcore_cli("ca", "init", "-p", "tls", "--trust-domain", "example.org", "ca",
                          "--ttl", "1h30m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ca" / "ca.key").exists()


@pytest.mark.parametrize("command, plugin", [("registry", "consul"), ("ca", "tls")])
def test_a_command_of_an_unlisted_plugin_names_the_plugin(tmp_path: Path, command: str, plugin: str):
    needs(plugin)
    result = meshcore_cli(command, cwd=tmp_path)
    assert result.returncode == 2
    assert f"No such command '{command}'" in result.stderr
    assert f"provided by plugin '{plugin}', which is installed but not in the plugin list" in result.stderr
    assert f"meshcore -p {plugin} {command}" in result.stderr


def test_an_unknown_command_nobody_provides_gets_no_plugin_hint(tmp_path: Path):
    result = meshcore_cli("registy", cwd=tmp_path)
    assert result.returncode == 2
    assert "No such command 'registy'" in result.stderr and "provided by" not in result.stderr


def test_declared_commands_are_the_ones_the_cli_hooks_add():
    """The `meshcore.commands` entry points (read without importing) stay true to the hooks."""
    installed = meshcore.installed_plugins()
    plugins = meshcore.Plugins(installed)
    group = click.Group()
    plugins.add_cli(group)
    declared = declared_commands()
    assert set(group.commands) == set(declared)
    for name, providers in declared.items():
        assert all(p in installed for p in providers), name


def test_shared_options_leave_a_command_its_own_flags():
    @click.command()
    @click.option("-p", "--port", type=int, default=1)
    def serve(port: int) -> None:
        click.echo(f"port {port}")

    shared_options(serve)
    result = CliRunner().invoke(serve, ["-p", "8080", "--plugin", "x", "-c", "mesh.toml"])
    assert result.exit_code == 0, result.output
    assert result.output == "port 8080\n"


@pytest.mark.parametrize(
    "argv, plugins, config",
    [
        (["-p", "a", "run", "--plugin", "b", "-pc"], ["a", "b", "c"], "mesh.toml"),
        (["-c", "a.toml", "run", "--config=b.toml"], [], "b.toml"),
        (["run", "-cx.toml", "--plugin=z"], ["z"], "x.toml"),
        (["run", "--", "-p", "not-a-plugin"], [], "mesh.toml"),
    ],
)
def test_the_plugin_list_is_read_from_anywhere_in_argv(monkeypatch, argv, plugins, config):
    monkeypatch.delenv("MESHCORE_CONFIG", raising=False)
    assert scan_plugin_options(argv) == (plugins, config)


def test_plugins_output_json(tmp_path: Path):
    result = meshcore_cli("plugins", "--output", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["error"] is None
    static = next(p for p in data["plugins"] if p["name"] == "static")
    assert static == {
        "name": "static", "distribution": "meshcore-servicemesh", "version": meshcore.__version__,
        "loaded": True, "families": ["config", "discovery"],
        "kinds": [{"name": "static", "family": "discovery"}],
    }
    others = [p for p in data["plugins"] if not p["loaded"]]
    assert all(p["families"] is None and p["kinds"] == [] for p in others)


def test_plugins_output_json_reports_a_broken_plugin_list(tmp_path: Path):
    result = meshcore_cli("plugins", "-o", "json", "-p", "nope", cwd=tmp_path)
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert "unknown plugin 'nope'" in data["error"]
    assert not any(p["loaded"] for p in data["plugins"])


def test_check_config_output_json(config: Path):
    needs("retry", "breaker")
    result = meshcore_cli("check-config", "-o", "json", "-p", "retry", "-p", "breaker",
                          cwd=config.parent)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "ok": True,
        "path": "mesh.toml",
        "plugins": ["static", "sidecar", "demo", "routing", "retry", "breaker"],
        "services": [{"name": "orders", "discovery": "static", "endpoints": 1, "balancer": None,
                      "resilience": ["retry", "breaker"]}],
        "error": None,
    }
    resolved = meshcore_cli("check-config", "--resolve", "-o", "json", "-p", "retry", "-p",
                            "breaker", cwd=config.parent)
    assert json.loads(resolved.stdout)["services"][0]["resolved"] == {
        "status": "skipped", "endpoints": None, "error": None}


def test_check_config_output_json_on_a_bad_config(tmp_path: Path):
    (tmp_path / "mesh.toml").write_text("[services.orders]\ndiscovery = 3\n")
    result = meshcore_cli("check-config", "-o", "json", cwd=tmp_path)
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["path"] == "mesh.toml"
    assert "mesh.toml: services.orders.discovery" in data["error"]


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"), ("zsh", "#compdef meshcore"),
                                           ("fish", "complete --no-files --command meshcore")])
def test_shell_completion_script(shell: str, marker: str):
    result = meshcore_cli(env={"_MESHCORE_COMPLETE": f"{shell}_source"}, script=True)
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout and "_MESHCORE_COMPLETE" in result.stdout


def test_shell_completion_completes_subcommands():
    result = meshcore_cli(script=True, env={
        "_MESHCORE_COMPLETE": "bash_complete", "COMP_WORDS": "meshcore check", "COMP_CWORD": "1",
    })
    assert result.returncode == 0, result.stderr
    assert {"plain,check", "plain,check-config"} <= set(result.stdout.split())


def test_version_names_the_distribution():
    result = meshcore_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"meshcore, version {meshcore.__version__}\n"
