"""The `meshcore` command.

Plugins in the plugin list may add subcommands (the `cli` hook), so the list is worked out from
argv before click parses it: `--plugin/-p`, then `MESHCORE_PLUGINS`, then `[mesh] plugins` of
the config file (`--config/-c`, `MESHCORE_CONFIG`, `mesh.toml`).

`-c/--config` and `-p/--plugin` are accepted before the subcommand and after it
(`meshcore run -c mesh.toml -p tls`), on plugin commands too: the group adds them to every
command it is given (`shared_options`). Every `-p` adds to the plugin list; the `-c` given last
(the subcommand's over the group's) wins.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._config import MeshConfig
from ._errors import ConfigError, PluginError
from ._plugins import (
    FIRST_PARTY,
    GROUP,
    Plugins,
    config_plugins,
    installed_plugins,
    resolve_plugin_list,
)

if TYPE_CHECKING:
    from ._check import Check
    from ._mesh import Mesh

__all__ = ["cli", "main", "shared_options"]

COMMANDS_GROUP = "meshcore.commands"
"""Entry-point group where a plugin distribution declares the subcommands its `cli` hook adds
(`registry = "meshcore_consul._cli:registry_command"`), so an unknown subcommand can name the
plugin that provides it without importing any plugin."""

# Subcommands of first-party plugins, for the hint when their distribution is not installed.
FIRST_PARTY_COMMANDS = {"registry": "consul", "ca": "tls"}

CORE_COMMANDS = ("plugins", "check-config", "check")


class Context:
    """What the command line chose: the plugin list and config file, merged from the group's
    options and each subcommand's."""

    def __init__(self, cli_plugins: Sequence[str], config: str | None, debug: bool) -> None:
        self.cli_plugins: list[str] = list(cli_plugins)
        self.config = config
        self.debug = debug
        self._plugins: Plugins | None = None

    @property
    def config_path(self) -> str:
        return self.config or "mesh.toml"

    @property
    def plugin_names(self) -> list[str]:
        return resolve_plugin_list(self.cli_plugins, config_plugins(self.config_path))

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


# -- -c/--config and -p/--plugin on every command ----------------------------------------------


def _merge_plugins(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    obj = ctx.find_object(Context)
    if obj is not None and value:
        obj.cli_plugins.extend(value)
        obj._plugins = None


def _merge_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    obj = ctx.find_object(Context)
    if obj is not None and value is not None:
        obj.config = value
        obj._plugins = None


def shared_options(command: click.Command) -> click.Command:
    """Add `-c/--config` and `-p/--plugin` to `command` and, for a group, its subcommands.

    The options merge into the `meshcore` group's choice (every `-p` adds a plugin, the last
    `-c` wins), so `meshcore registry -p consul` means `meshcore -p consul registry`. The
    `meshcore` group applies this to every command it is given, plugin commands included, so
    plugins need not. A flag the command already uses for something else is left to it.
    """
    taken = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    names = {param.name for param in command.params}
    if "meshcore_plugins" not in names:
        flags = [f for f in ("-p", "--plugin") if f not in taken]
        if flags:
            command.params.append(click.Option(
                [*flags, "meshcore_plugins"], multiple=True, expose_value=False,
                callback=_merge_plugins, metavar="NAME",
                help="Plugin to load (repeatable; adds to the plugin list).",
            ))
    if "meshcore_config" not in names:
        flags = [f for f in ("-c", "--config") if f not in taken]
        if flags:
            command.params.append(click.Option(
                [*flags, "meshcore_config"], expose_value=False, callback=_merge_config,
                metavar="FILE", help="Config file (default mesh.toml, or $MESHCORE_CONFIG).",
            ))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            shared_options(sub)
    return command


class MeshcoreGroup(click.Group):
    """The `meshcore` group: shared options on every command, and an unknown subcommand that an
    installed plugin provides names that plugin."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        super().add_command(shared_options(cmd), name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if (
            name
            and not name.startswith("-")
            and not ctx.resilient_parsing
            and self.get_command(ctx, name) is None
        ):
            hint = command_hint(name)
            if hint:
                ctx.fail(f"No such command {name!r}. {hint}")
        return super().resolve_command(ctx, args)


def declared_commands() -> dict[str, list[str]]:
    """Subcommand name -> plugins whose distribution declares it in `meshcore.commands`.

    Reads entry-point metadata only: answering "which plugin has `registry`?" imports nothing.
    """
    import importlib.metadata as metadata  # only on this error path: it is slow to import

    found: dict[str, list[str]] = {}
    for dist in metadata.distributions():
        eps = dist.entry_points
        commands = [ep.name for ep in eps if ep.group == COMMANDS_GROUP]
        if not commands:
            continue
        plugins = [ep.name for ep in eps if ep.group == GROUP]
        for command in commands:
            found.setdefault(command, []).extend(p for p in plugins if p not in found.get(command, []))
    return found


def command_hint(name: str) -> str:
    """How to get subcommand `name` when a plugin outside the plugin list provides it."""
    providers = declared_commands().get(name) or [FIRST_PARTY_COMMANDS.get(name, "")]
    installed = installed_plugins()
    plugin = next((p for p in providers if p in installed), providers[0])
    if not plugin:
        return ""
    if plugin in installed:
        return (
            f"It is provided by plugin {plugin!r}, which is installed but not in the plugin "
            f"list: run `meshcore -p {plugin} {name} ...`, or add {plugin!r} to MESHCORE_PLUGINS "
            "or to `[mesh] plugins` in the config."
        )
    install = f"`pip install {FIRST_PARTY[plugin]}`" if plugin in FIRST_PARTY else "install it"
    return (
        f"It is provided by plugin {plugin!r}, which is not installed: {install}, then run "
        f"`meshcore -p {plugin} {name} ...`."
    )


def _output_option(command: Any) -> Any:
    return click.option(
        "--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True,
        help="json: one JSON document on stdout, for scripts (see docs/cli.md).",
    )(command)


# -- the group and the core's commands -----------------------------------------------------------


@click.group(cls=MeshcoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "--plugin", "plugins", multiple=True, metavar="NAME",
              help="Plugin to load (repeatable).")
@click.option(
    "-c", "--config", "config", default=None, envvar="MESHCORE_CONFIG", metavar="FILE",
    help="Config file (default mesh.toml).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="meshcore-servicemesh")
@click.pass_context
def cli(ctx: click.Context, plugins: tuple[str, ...], config: str | None, debug: bool) -> None:
    """meshcore: a service mesh for Python (library mode and sidecar).

    -c/--config and -p/--plugin work before or after the subcommand.
    """
    ctx.obj = Context(plugins, config, debug)


@cli.command("plugins")
@_output_option
@click.pass_obj
def plugins_command(obj: Context, output: str) -> None:
    """List installed plugins and whether the plugin list loads them."""
    installed = installed_plugins()
    error = None
    loaded: Plugins | None
    try:
        loaded = obj.plugins
    except PluginError as exc:
        error = str(exc)
        loaded = None
    rows: list[dict[str, Any]] = []
    for name in sorted(installed):
        info = installed[name]
        in_list = loaded is not None and name in loaded.names
        kinds = (
            [{"name": k, "family": loaded.kinds[k].family}
             for k in loaded.kinds if loaded.kind_owner[k] == name]
            if loaded is not None and in_list else []
        )
        rows.append({
            "name": name,
            "distribution": info.distribution,
            "version": info.version,
            "loaded": in_list,
            "families": loaded.families_of(name) if loaded is not None and in_list else None,
            "kinds": kinds,
        })
    if output == "json":
        click.echo(json.dumps({"plugins": rows, "error": error}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    if error is not None:
        click.echo(f"meshcore: warning: {error}", err=True)
    table = Table("plugin", "distribution", "version", "hook families", "kinds", "loaded")
    for row in rows:
        families = ", ".join(row["families"]) if row["families"] is not None else "(not imported)"
        kinds = ", ".join(f"{k['name']} ({k['family']})" for k in row["kinds"])
        table.add_row(row["name"], row["distribution"], row["version"], families, kinds,
                      "yes" if row["loaded"] else "no")
    Console(width=200).print(table)


@cli.command("check-config")
@click.argument("path", required=False)
@click.option(
    "--resolve", is_flag=True,
    help="Also resolve each service once through its discovery (where it has resolve_once).",
)
@_output_option
@click.pass_obj
def check_config(obj: Context, path: str | None, resolve: bool, output: str) -> None:
    """Validate a config and print each service's resolved pipeline."""
    path = path or obj.config_path
    try:
        from ._mesh import Mesh

        raw = MeshConfig.load(path)
        mesh = Mesh(raw, list(obj.cli_plugins) or None)
    except (ConfigError, PluginError) as exc:
        if output == "json" and not obj.debug:
            click.echo(json.dumps({"ok": False, "path": path, "error": str(exc)}, indent=2))
            sys.exit(2)
        _fail(exc, obj.debug)
        return
    resolved = _resolve(mesh) if resolve else None
    ok = resolved is None or all(not isinstance(r, BaseException) for _, _, r in resolved)
    if output == "json":
        by_service = {name: result for name, _, result in resolved or ()}
        services = []
        for name, svc in mesh.config.services.items():
            entry = describe_pipeline(name, svc)
            if resolved is not None:
                entry["resolved"] = _resolved_json(by_service[name])
            services.append(entry)
        click.echo(json.dumps({
            "ok": ok, "path": path, "plugins": mesh.plugins.names, "services": services,
            "error": None,
        }, indent=2))
        sys.exit(0 if ok else 1)
    for line in describe_pipelines(mesh):
        click.echo(line)
    _print_resolved(resolved or [])
    if not ok:
        sys.exit(1)
    count = len(mesh.config.services)
    click.echo(f"{path}: ok ({count} service{'s' if count != 1 else ''}, plugins: {', '.join(mesh.plugins.names)})")


def _endpoints(count: int) -> str:
    return f"{count} endpoint{'s' if count != 1 else ''}"


def _resolve(mesh: Mesh) -> list[tuple[str, str, Any]]:
    import anyio

    from ._check import resolve_once_all

    return anyio.run(resolve_once_all, mesh)


def _resolved_json(result: Any) -> dict[str, Any]:
    if result is None:
        return {"status": "skipped", "endpoints": None, "error": None}
    if isinstance(result, BaseException):
        return {"status": "error", "endpoints": None, "error": str(result)}
    return {"status": "ok", "endpoints": [ep.id for ep in result], "error": None}


def _print_resolved(resolved: list[tuple[str, str, Any]]) -> None:
    """`check-config --resolve`'s lines: endpoints, the error, or why it was skipped."""
    for name, kind, result in resolved:
        if result is None:
            click.echo(f"{name}: {kind} cannot resolve ahead of time (skipped)")
        elif isinstance(result, BaseException):
            click.echo(f"{name}: error: {result}", err=True)
        else:
            ids = ", ".join(ep.id for ep in result) or "(none)"
            click.echo(f"{name}: resolved {_endpoints(len(result))}: {ids}")


def describe_pipeline(name: str, svc: Any) -> dict[str, Any]:
    endpoints = len(svc.settings_for("static").endpoints) if svc.discovery == "static" else None
    return {
        "name": name,
        "discovery": svc.discovery,
        "endpoints": endpoints,
        "balancer": svc.balancer,
        "resilience": list(svc.resilience),
    }


def describe_pipelines(mesh: Any) -> list[str]:
    """`orders: static (3 endpoints) -> round-robin -> [retry, breaker]` per service."""
    lines = []
    for name, svc in mesh.config.services.items():
        entry = describe_pipeline(name, svc)
        discovery = entry["discovery"]
        if entry["endpoints"] is not None:
            discovery = f"static ({_endpoints(entry['endpoints'])})"
        balancer = entry["balancer"] or "(single endpoint)"
        layers = ", ".join(entry["resilience"])
        lines.append(f"{name}: {discovery} -> {balancer} -> [{layers}]")
    return lines


@cli.command("check")
@click.option("--no-listeners", is_flag=True,
              help="Skip the listener-port checks (when the sidecar is already running).")
@_output_option
@click.pass_obj
def check_command(obj: Context, no_listeners: bool, output: str) -> None:
    """Check that this machine and config are ready: config, plugins, listener ports,
    discovery, and what each plugin checks (certificates, agents).

    Each line is ✓ or ✗ with the fix; exits 1 when any check fails.
    """
    checks = run_checks(obj, listeners=not no_listeners)
    ok = all(check.ok for _, check in checks)
    if output == "json":
        click.echo(json.dumps({
            "ok": ok,
            "checks": [{"source": source, **check.as_dict()} for source, check in checks],
        }, indent=2))
    else:
        for _, check in checks:
            mark = "✓" if check.ok else "✗"
            click.echo(f"{mark} {check.title}" + (f": {check.detail}" if check.detail else ""))
            if not check.ok and check.fix:
                click.echo(f"    fix: {check.fix}")
        failed = sum(not check.ok for _, check in checks)
        click.echo(f"{len(checks)} checks, {failed} failed" if failed else f"all {len(checks)} checks passed")
    sys.exit(0 if ok else 1)


def run_checks(obj: Context, *, listeners: bool = True) -> list[tuple[str, Check]]:
    """Every line of `meshcore check`, as (source, Check); source is "core" or a plugin name."""
    import anyio

    from ._check import Check, listener_checks, resolve_once_all, run_probes
    from ._mesh import Mesh

    path = obj.config_path
    checks: list[tuple[str, Check]] = []
    try:
        raw = MeshConfig.load(path)
    except ConfigError as exc:
        fix = ("create it, or point -c/--config or MESHCORE_CONFIG at your config"
               if not Path(path).exists() else "correct the key the message names")
        return [("core", Check(f"config {path}", False, str(exc), fix))]
    try:
        mesh = Mesh(raw, list(obj.cli_plugins) or None)
    except PluginError as exc:
        return [
            ("core", Check(f"config {path}", True, "parsed")),
            ("core", Check("plugins", False, str(exc),
                           "fix the plugin list (-p, MESHCORE_PLUGINS, [mesh] plugins) or install "
                           "the distribution the message names")),
        ]
    except ConfigError as exc:
        return [
            ("core", Check("plugins", True, f"loaded: {', '.join(_plugin_list(obj, raw))}")),
            ("core", Check(f"config {path}", False, str(exc), "correct the key the message names")),
        ]
    services = len(mesh.config.services)
    checks.append(("core", Check("plugins", True, f"loaded: {', '.join(mesh.plugins.names)}")))
    checks.append(("core", Check(f"config {path}", True,
                                 f"valid, {services} service{'s' if services != 1 else ''}")))
    if listeners:
        sidecar = mesh.config.section("sidecar")
        found = listener_checks((name, sidecar[name]) for name in ("outbound", "inbound", "admin"))
        checks.extend(("core", c) for c in found)

    async def resolve_and_probe() -> list[tuple[str, Check]]:
        out: list[tuple[str, Check]] = []
        for name, kind, result in await resolve_once_all(mesh):
            title = f"discovery {name} ({kind})"
            if result is None:
                listed = describe_pipeline(name, mesh.config.services[name])["endpoints"]
                detail = (f"{_endpoints(listed)} listed in the config" if listed is not None
                          else "cannot resolve ahead of time (not checked)")
                out.append(("core", Check(title, True, detail)))
            elif isinstance(result, BaseException):
                out.append(("core", Check(title, False, str(result),
                                          f"check services.{name}.{kind} in the config and that "
                                          "what it points at is up")))
            elif not result:
                out.append(("core", Check(title, False, "resolved to no endpoints",
                                          "register or start instances of the service")))
            else:
                ids = ", ".join(ep.id for ep in result[:5]) + (", ..." if len(result) > 5 else "")
                out.append(("core", Check(title, True, f"{_endpoints(len(result))}: {ids}")))
        try:
            probes = mesh.plugins.checks(mesh.config)
        except PluginError as exc:
            out.append(("core", Check("plugin checks", False, str(exc), "fix or report the plugin")))
            probes = []
        out.extend(await run_probes(probes))
        return out

    checks.extend(anyio.run(resolve_and_probe))
    return checks


def _plugin_list(obj: Context, raw: MeshConfig) -> list[str]:
    return resolve_plugin_list(obj.cli_plugins or None, raw.plugins)


# -- entry point -------------------------------------------------------------------------------


def scan_plugin_options(argv: Sequence[str]) -> tuple[list[str], str]:
    """The `-p` values and the config path in `argv`, wherever they appear (before `--`).

    Needed before click parses: the plugin list decides which subcommands exist.
    """
    plugins: list[str] = []
    config = os.environ.get("MESHCORE_CONFIG", "mesh.toml")
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg in ("-p", "--plugin", "-c", "--config"):
            if i + 1 < len(argv):
                if arg in ("-p", "--plugin"):
                    plugins.append(argv[i + 1])
                else:
                    config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--plugin="):
            plugins.append(arg.split("=", 1)[1])
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-p") and not arg.startswith("--"):
            plugins.append(arg[2:])
        elif arg.startswith("-c") and not arg.startswith("--"):
            config = arg[2:]
        i += 1
    return plugins, config


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    plugins, config = scan_plugin_options(argv)
    try:
        Plugins(resolve_plugin_list(plugins, config_plugins(config))).add_cli(cli)
    except PluginError as exc:
        # Core commands still work (`meshcore plugins` shows what is installed, `meshcore
        # check` reports it as a failed line); commands a plugin would add are missing, so say
        # why once.
        if not any(a in (*CORE_COMMANDS, "-h", "--help", "--version") for a in argv):
            _fail(exc, debug)
    cli.main(args=argv, prog_name="meshcore")


if __name__ == "__main__":  # pragma: no cover
    main()
