"""The `meshcore` command's entry point: a plain `meshcore run` starts without click.

click, what it imports (uuid, platform, gettext; difflib when it parses) and the CLI's
modules were 1.9 MiB of a sidecar's idle memory and ~20 ms of CPU of its start
(docs/data-path.md, "Start-up time and idle memory"), and the sidecar never uses them. So a
command line made only of the options `meshcore run` documents, each in its plain form
(`--backend uvloop`, `--backend=uvloop`, `-c FILE`, `-p NAME`, ...) with valid values, is
parsed here and runs the same `run_sidecar` the click command runs. Anything else — `--help`,
`--debug`, `--version`, an unknown or malformed option, a value click would refuse, a plugin
list that fails to load, a plugin outside `_COMMANDS_ONLY` with a `cli` hook — goes to the
click CLI (`meshcore._cli.main`) unchanged, so its output and errors stay click's.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Modules whose `meshcore_cli` hook only adds its own subcommands, so skipping the hook cannot
# change `run`: the built-in sidecar (it adds `run` itself) and demo, and the first-party tls
# and consul plugins. Any other plugin with a `cli` hook sends `run` through click.
_COMMANDS_ONLY = frozenset({"meshcore._sidecar", "meshcore._demo", "meshcore_tls", "meshcore_consul"})

_GROUP_OPTIONS = {"-c": "config", "--config": "config", "-p": "plugin", "--plugin": "plugin"}
_RUN_OPTIONS = {
    **_GROUP_OPTIONS,
    "--backend": "backend",
    "--log-level": "log_level",
    "--workers": "workers",
    "--worker-of": "worker_of",
    "--worker-index": "worker_index",
    "--worker-dir": "worker_dir",
}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not _run_without_click(args):
        from ._cli import main as cli_main

        cli_main(args)


def parse_run(args: Sequence[str]) -> dict[str, list[str]] | None:
    """`meshcore [-c/-p ...] run [options]` as {option name: its values in order}, or None
    when `args` is anything else or uses a form this parser leaves to click."""
    values: dict[str, list[str]] = {}
    options = _GROUP_OPTIONS
    seen_run = False
    i = 0
    while i < len(args):
        arg = args[i]
        if not seen_run and arg == "run":
            seen_run = True
            options = _RUN_OPTIONS
            i += 1
            continue
        flag, eq, value = arg.partition("=")
        if flag not in options or (eq and not flag.startswith("--")):
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            value = args[i + 1]
            i += 1
        if value.startswith("-"):
            return None  # click may read it as the value or as an option: let click decide
        values.setdefault(options[flag], []).append(value)
        i += 1
    return values if seen_run else None


def _run_without_click(args: Sequence[str]) -> bool:
    """Run the sidecar as `meshcore run` would with these `args` and return True, or return
    False (having done nothing) for click to handle them."""
    values = parse_run(args)
    if values is None:
        return False
    from ._backends import BACKENDS, default_backend

    last = {name: found[-1] for name, found in values.items()}
    backend = last.get("backend") or default_backend()
    log_level = last.get("log_level", "info")
    if backend not in BACKENDS or log_level not in _LOG_LEVELS:
        return False
    worker_numbers: dict[str, int] = {}
    for name in ("worker_of", "worker_index"):
        if name in last:
            try:
                worker_numbers[name] = int(last[name])
            except ValueError:
                return False
    worker_dir = last.get("worker_dir")
    if worker_dir is not None:
        try:
            if stat.S_ISREG(os.stat(worker_dir).st_mode):
                return False  # click.Path(file_okay=False) refuses a file
        except OSError:
            pass
    count = 1
    if "workers" in last:  # its module is not needed by a sidecar of one process
        from ._sidecar._workers import worker_count

        try:
            count = worker_count(last["workers"])
        except ValueError:
            return False

    from ._errors import PluginError
    from ._plugins import Plugins, config_plugins, hand_over, resolve_plugin_list

    cli_plugins = values.get("plugin", [])
    env_config = os.environ.get("MESHCORE_CONFIG")
    # As the click path reads them: `scan_plugin_options` for the plugin list, the group's
    # `-c` (envvar MESHCORE_CONFIG, empty meaning unset) then the subcommand's for the config.
    plugin_config = last.get("config", env_config if env_config is not None else "mesh.toml")
    config_path = last.get("config", env_config or None) or "mesh.toml"
    try:
        plugins = Plugins(resolve_plugin_list(cli_plugins, config_plugins(plugin_config)))
    except PluginError:
        return False
    if any(impl.function.__module__ not in _COMMANDS_ONLY
           for impl in plugins.pm.hook.meshcore_cli.get_hookimpls()):
        return False

    from ._sidecar._run import run_sidecar

    hand_over(plugins)  # the sidecar's mesh loads the same list: not twice
    try:
        run_sidecar(config_path, cli_plugins, backend, log_level, count,
                    worker_numbers.get("worker_of"), worker_numbers.get("worker_index"),
                    worker_dir)
    except KeyboardInterrupt:  # before the sidecar ran: what click's main prints
        sys.stderr.write("\nAborted!\n")
        sys.exit(1)
    finally:
        hand_over(None)
    return True
