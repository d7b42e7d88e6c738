"""`meshcore run`: the sidecar as a process.

Backend: uvloop where it is installed, else trio, else asyncio (`meshcore._backends`, where
the figures that chose it are cited); `--backend` or MESHCORE_BACKEND picks another.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .._backends import BACKENDS, DEFAULT_HELP, default_backend, run

__all__ = ["run_command"]


@click.command("run")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=default_backend,
    show_default=DEFAULT_HELP,
    help="Event loop the sidecar runs on.",
)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_obj
def run_command(obj: Any, backend: str, log_level: str) -> None:
    """Run the sidecar: outbound, inbound and admin listeners around the mesh.

    SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config file.
    """
    from .._config import MeshConfig
    from .._errors import ConfigError, PluginError
    from ._runtime import Sidecar

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = MeshConfig.load(obj.config_path)
        sidecar = Sidecar(config, list(obj.cli_plugins) or None, config_path=obj.config_path)
    except (ConfigError, PluginError) as exc:
        click.echo(f"meshcore: error: {exc}", err=True)
        sys.exit(2)

    async def main() -> None:
        async with sidecar:
            click.echo(
                "meshcore: sidecar ready to accept: "
                + ", ".join(f"{k} {v}" for k, v in sidecar.addresses.items()),
                err=True,
            )
            await sidecar.serve()

    try:
        run(main, backend)
    except ConfigError as exc:  # a listener could not bind
        click.echo(f"meshcore: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
