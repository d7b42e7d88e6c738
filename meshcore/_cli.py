"""The `meshcore` command.

Plugins in the plugin list may add subcommands (the `cli` hook), so the list is worked out from
argv before click parses it: `--plugin/-p`, then `MESHCORE_PLUGINS`, then `[mesh] plugins` of
the config file (`--config/-c`, `MESHCORE_CONFIG`, `mesh.toml`).
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from ._config import MeshConfig
from ._errors import ConfigError, PluginError
from ._plugins import Plugins, installed_plugins, resolve_plugin_list

__all__ = ["main", "cli"]


class Context:
    def __init__(
        self, cli_plugins: tuple[str, ...], plugin_names: list[str], config_path: str, debug: bool
    ) -> None:
        self.cli_plugins = cli_plugins
        self.plugin_names = plugin_names
        self.config_path = config_path
        self.debug = debug
        self._plugins: Plugins | None = None

    @property
    def plugins(self) -> Plugins:
        if self._plugins is None:
            self._plugins = Plugins(self.plugin_names)
        return self._plugins


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    click.echo(f"meshcore: error: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "--plugin", "plugins", multiple=True, help="Plugin to load (repeatable).")
@click.option(
    "-c", "--config", "config", default=None, envvar="MESHCORE_CONFIG",
    help="Config file (default mesh.toml).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="meshcore")
@click.pass_context
def cli(ctx: click.Context, plugins: tuple[str, ...], config: str | None, debug: bool) -> None:
    """meshcore: a service mesh for Python (library mode and sidecar)."""
    config_path = config or "mesh.toml"
    names = resolve_plugin_list(plugins, _config_plugins(config_path))
    ctx.obj = Context(plugins, names, config_path, debug)


def _config_plugins(path: str) -> list[str]:
    """`[mesh] plugins` of the config file, read leniently (check-config reports errors)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        plugins = data.get("mesh", {}).get("plugins", [])
        return [p for p in plugins if isinstance(p, str)] if isinstance(plugins, list) else []
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return []


@cli.command("plugins")
@click.pass_obj
def plugins_command(obj: Context) -> None:
    """List installed plugins and whether the plugin list loads them."""
    from rich.console import Console
    from rich.table import Table

    installed = installed_plugins()
    try:
        loaded = obj.plugins
    except PluginError as exc:
        click.echo(f"meshcore: warning: {exc}", err=True)
        loaded = None
    table = Table("plugin", "distribution", "version", "hook families", "kinds", "loaded")
    for name in sorted(installed):
        info = installed[name]
        listed = loaded if loaded is not None and name in loaded.names else None
        families = ", ".join(listed.families_of(name)) if listed is not None else "(not imported)"
        kinds = (
            ", ".join(f"{k} ({listed.kinds[k].family})" for k in listed.kinds if listed.kind_owner[k] == name)
            if listed is not None
            else ""
        )
        table.add_row(name, info.distribution, info.version, families, kinds, "yes" if listed is not None else "no")
    Console(width=200).print(table)


@cli.command("check-config")
@click.argument("path", required=False)
@click.option(
    "--resolve", is_flag=True,
    help="Also resolve each service once through its discovery (where it has resolve_once).",
)
@click.pass_obj
def check_config(obj: Context, path: str | None, resolve: bool) -> None:
    """Validate a config and print each service's resolved pipeline."""
    path = path or obj.config_path
    try:
        from ._mesh import Mesh

        raw = MeshConfig.load(path)
        mesh = Mesh(raw, list(obj.cli_plugins) or None)
    except (ConfigError, PluginError) as exc:
        _fail(exc, obj.debug)
        return
    for line in describe_pipelines(mesh):
        click.echo(line)
    if resolve and not resolve_services(mesh):
        sys.exit(1)
    click.echo(f"{path}: ok ({len(mesh.config.services)} services, plugins: {', '.join(mesh.plugins.names)})")


def resolve_services(mesh: Any) -> bool:
    """Build each service's discovery and await its optional `resolve_once()` (a convention,
    not a hook: a Discovery may offer `async def resolve_once(self) -> list[Endpoint]`).
    Prints the endpoints or the error per service; False when any failed."""
    import anyio

    async def run() -> bool:
        ok = True
        for name, svc in mesh.config.services.items():
            try:
                discovery = mesh.plugins.discovery(svc.discovery, svc.settings_for(svc.discovery), name)
                resolve_once = getattr(discovery, "resolve_once", None)
                if resolve_once is None:
                    click.echo(f"{name}: {svc.discovery} cannot resolve ahead of time (skipped)")
                    continue
                endpoints = await resolve_once()
            except Exception as exc:  # noqa: BLE001 - reported per service
                click.echo(f"{name}: error: {exc}", err=True)
                ok = False
                continue
            ids = ", ".join(ep.id for ep in endpoints) or "(none)"
            click.echo(f"{name}: resolved {len(endpoints)} endpoint{'s' if len(endpoints) != 1 else ''}: {ids}")
        return ok

    return anyio.run(run)


def describe_pipelines(mesh: Any) -> list[str]:
    """`orders: static (3 endpoints) -> round-robin -> [retry, breaker]` per service."""
    lines = []
    for name, svc in mesh.config.services.items():
        discovery = svc.discovery
        if discovery == "static":
            count = len(svc.settings_for("static").endpoints)
            discovery = f"static ({count} endpoint{'s' if count != 1 else ''})"
        balancer = svc.balancer or "(single endpoint)"
        layers = ", ".join(svc.resilience)
        lines.append(f"{name}: {discovery} -> {balancer} -> [{layers}]")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        _add_plugin_commands(argv)
    except PluginError as exc:
        # Core commands still work (`meshcore plugins` shows what is installed); commands a
        # plugin would add are missing, so say why once.
        if not any(a in ("plugins", "check-config", "-h", "--help", "--version") for a in argv):
            _fail(exc, debug)
    cli.main(args=argv, prog_name="meshcore")


def _add_plugin_commands(argv: list[str]) -> None:
    cli_plugins: list[str] = []
    config = os.environ.get("MESHCORE_CONFIG", "mesh.toml")
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg in ("-p", "--plugin") and i + 1 < len(argv):
            cli_plugins.append(argv[i + 1])
            next(it, None)
        elif arg.startswith("--plugin="):
            cli_plugins.append(arg.split("=", 1)[1])
        elif arg in ("-c", "--config") and i + 1 < len(argv):
            config = argv[i + 1]
            next(it, None)
        elif not arg.startswith("-"):
            break
    names = resolve_plugin_list(cli_plugins, _config_plugins(config))
    Plugins(names).add_cli(cli)


if __name__ == "__main__":  # pragma: no cover
    main()
