"""`meshcore run` without click (`meshcore._main`): the same call click would make, or click.

Both paths end in `meshcore._sidecar._run.run_sidecar`; here it is replaced by a recorder, and
each command line goes once through the entry point's parser and once through the click CLI.
A command line the parser takes must give `run_sidecar` exactly what click gives it; any other
must be left to click untouched (the parser returns False and has called nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshcore import _main
from meshcore._sidecar import _run

CONFIG = """
[mesh]
plugins = ["round-robin", "retry", "breaker"]
[defaults]
balancer = "round-robin"
resilience = ["retry", "breaker"]
[services.orders]
discovery = "static"
[services.orders.static]
endpoints = ["127.0.0.1:8001", "127.0.0.1:8002"]
"""


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[Any, ...]]:
    for name in ("MESHCORE_PLUGINS", "MESHCORE_CONFIG", "MESHCORE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mesh.toml").write_text(CONFIG)
    (tmp_path / "other.toml").write_text(CONFIG)
    (tmp_path / "workers").mkdir()
    (tmp_path / "a-file").write_text("")
    recorded: list[tuple[Any, ...]] = []

    def record(*args: Any) -> None:
        recorded.append((args[0], list(args[1]), *args[2:]))

    monkeypatch.setattr(_run, "run_sidecar", record)
    return recorded


def through_click(argv: list[str]) -> None:
    from meshcore._cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code in (0, None)


TAKEN = [
    ["run"],
    ["-c", "other.toml", "run"],
    ["run", "-c", "other.toml"],
    ["--config=other.toml", "run", "--backend", "asyncio", "--log-level=warning"],
    ["-p", "retry", "run", "-p", "breaker", "--plugin=round-robin", "-c", "other.toml"],
    ["-c", "missing.toml", "run", "--config", "other.toml"],
    ["run", "--backend", "trio", "--backend", "asyncio"],
    ["run", "--workers", "2"],
    ["run", "--workers=auto"],
    ["run", "--worker-of", "1", "--worker-index", "0", "--worker-dir", "workers"],
    ["run", "--worker-of", " 7", "--worker-index", "1", "--worker-dir", "not-yet-there"],
    ["run", "-c", ""],
]


@pytest.mark.parametrize("argv", TAKEN, ids=" ".join)
def test_a_plain_run_is_parsed_as_click_parses_it(calls: list[tuple[Any, ...]], argv: list[str]):
    assert _main._run_without_click(argv) is True
    through_click(argv)
    assert len(calls) == 2
    assert calls[0] == calls[1]


def test_the_environment_is_read_as_click_reads_it(calls, monkeypatch, tmp_path):
    monkeypatch.setenv("MESHCORE_CONFIG", str(tmp_path / "other.toml"))
    monkeypatch.setenv("MESHCORE_BACKEND", "asyncio")
    monkeypatch.setenv("MESHCORE_PLUGINS", "retry")
    for argv in (["run"], ["run", "-c", "mesh.toml"]):
        assert _main._run_without_click(argv) is True
        through_click(argv)
    assert calls[0] == calls[1] and calls[2] == calls[3]
    assert calls[0][0] == str(tmp_path / "other.toml") and calls[0][2] == "asyncio"
    assert calls[2][0] == "mesh.toml"
    monkeypatch.setenv("MESHCORE_CONFIG", "")  # empty: unset, for click too
    assert _main._run_without_click(["run"]) is True
    through_click(["run"])
    assert calls[4] == calls[5] and calls[4][0] == "mesh.toml"


LEFT_TO_CLICK = [
    [],
    ["plugins"],
    ["run", "--help"],
    ["run", "-h"],
    ["--help", "run"],
    ["--debug", "run"],
    ["--version"],
    ["run", "--backend", "nope"],
    ["run", "--log-level", "INFO"],
    ["run", "--workers", "0"],
    ["run", "--workers", "many"],
    ["run", "--worker-of", "x", "--worker-index", "0", "--worker-dir", "workers"],
    ["run", "--worker-of", "1", "--worker-index", "0", "--worker-dir", "a-file"],
    ["run", "extra"],
    ["run", "run"],
    ["run", "--backend"],
    ["run", "--backend", "--log-level", "info"],
    ["-pretry", "run"],
    ["-c=mesh.toml", "run"],
    ["run", "--"],
    ["run", "--no-such-option"],
    ["--backend", "asyncio", "run"],
    ["-p", "no-such-plugin", "run"],
]


@pytest.mark.parametrize("argv", LEFT_TO_CLICK, ids=lambda a: " ".join(a) or "(none)")
def test_anything_else_is_left_to_click(calls: list[tuple[Any, ...]], argv: list[str]):
    assert _main._run_without_click(argv) is False
    assert calls == []


def test_a_bad_backend_from_the_environment_is_left_to_click(calls, monkeypatch):
    monkeypatch.setenv("MESHCORE_BACKEND", "nope")
    assert _main._run_without_click(["run"]) is False


def test_a_plugin_with_a_cli_hook_not_known_to_only_add_commands_goes_to_click(calls, monkeypatch):
    """A plugin's `cli` hook might change `run`: with demo's hook no longer in the known set,
    the plugin list (which always has demo) sends `run` through click."""
    monkeypatch.setattr(_main, "_COMMANDS_ONLY", _main._COMMANDS_ONLY - {"meshcore._demo"})
    assert _main._run_without_click(["run"]) is False
    assert calls == []


def test_the_entry_point_hands_other_commands_to_click(capsys, monkeypatch):
    monkeypatch.delenv("MESHCORE_PLUGINS", raising=False)
    with pytest.raises(SystemExit) as done:
        _main.main(["run", "--help"])
    assert done.value.code == 0
    assert "--workers" in capsys.readouterr().out


def test_the_sidecar_reuses_the_plugin_list_the_entry_point_loaded(calls, monkeypatch):
    from meshcore import _plugins
    from meshcore._config import MeshConfig
    from meshcore._sidecar._runtime import Sidecar

    built: list[tuple[Any, ...]] = []

    def start(config_path: str, cli_plugins: list[str], *rest: Any) -> None:
        handed = _plugins._handed_over
        first = Sidecar(MeshConfig.load(config_path), list(cli_plugins) or None)
        again = Sidecar(MeshConfig.load(config_path), list(cli_plugins) or None)  # as a reload
        built.append((handed, first._pending, again._pending))

    monkeypatch.setattr(_run, "run_sidecar", start)
    assert _main._run_without_click(["run"])
    (handed, first, again), = built
    assert handed is not None and first is not None and again is not None
    assert first.plugins is handed and again.plugins is not handed
    # The kept list with the sidecar's own plugins added is the list loaded in one go.
    assert first.plugins.names == again.plugins.names
    assert "sidecar-telemetry" in first.plugins.names
    assert first.plugins.kind_owner == again.plugins.kind_owner
    assert _plugins._handed_over is None


def test_a_kept_plugin_list_is_used_only_for_the_same_names():
    from meshcore._plugins import Plugins, hand_over, resolve_plugin_list

    kept = Plugins(resolve_plugin_list(["round-robin"]))
    hand_over(kept)
    other = Plugins.load(resolve_plugin_list(["retry"]))
    assert other is not kept and "retry" in other.names and "round-robin" not in other.names
    assert Plugins.load(resolve_plugin_list(["round-robin"])) is not kept  # used up
