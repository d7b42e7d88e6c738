"""The built-in `sidecar` plugin: `meshcore run` and its `[sidecar]` config section.

Like `static`, it is registered through the `meshcore` entry-point group from the core
distribution and uses the same hooks a third-party plugin would: `meshcore_kinds` declares the
`[sidecar]` section (so a typo in it fails at load with the key path), and `meshcore_cli` adds
the `run` command. The runtime itself (`_runtime.Sidecar`) is only imported when `run` starts.
See docs/sidecar.md.
"""

from __future__ import annotations

from typing import Any

from .._plugins import Kind, hookimpl
from ._settings import SETTINGS

__all__ = ["meshcore_cli", "meshcore_kinds"]


@hookimpl
def meshcore_kinds() -> list[Kind]:
    return [
        Kind(
            "sidecar",
            "section",
            SETTINGS,
            help="the sidecar runtime (`meshcore run`): listeners, local app, limits, drain",
        )
    ]


@hookimpl
def meshcore_cli(cli: Any) -> None:
    from ._cli import run_command

    cli.add_command(run_command)
