"""The built-in `demo` plugin: `meshcore demo`, the first command a newcomer runs.

Like `static` and `sidecar` it is registered through the `meshcore` entry-point group from the
core distribution and only uses the `cli` hook. Everything heavy (rich, the sidecar runtime,
the plugins it shows off) is imported when the command runs, not when the CLI starts.

The demo shows the plugins that are installed and says which ones it leaves out: it finds
them by their entry points (`consul`, `tls`, `weighted`/`round-robin`, `retry`, `breaker`),
exactly as a mesh does, and never imports a plugin package by name. See docs/demo.md.
"""

from __future__ import annotations

from typing import Any

from .._plugins import hookimpl

__all__ = ["OPTIONAL_PLUGINS", "meshcore_cli"]

# The plugins the demo shows off when installed (`--without` leaves one out). Here, not in
# `_scenario`, so that the `--without` choices do not import the scenario with every command.
OPTIONAL_PLUGINS = ("consul", "tls", "weighted", "round-robin", "retry", "breaker")


@hookimpl
def meshcore_cli(cli: Any) -> None:
    from ._cli import demo_command

    cli.add_command(demo_command)
