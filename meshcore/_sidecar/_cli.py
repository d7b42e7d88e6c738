"""`meshcore run`: the sidecar as a process.

Backend: trio by default when installed. Measured on this project's machines, anyio on trio
proxied with httptools at about 41 µs of CPU per request against 77 µs on asyncio (anyio's
asyncio streams pause and resume reading around every receive):
shared/reference/performance-baselines.md. `--backend asyncio` or `uvloop` picks the others.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import anyio
import click

__all__ = ["run_command"]


def _default_backend() -> str:
    env = os.environ.get("MESHCORE_BACKEND")
    if env:
        return env
    try:
        import trio  # noqa: F401
    except ImportError:
        return "asyncio"
    return "trio"


@click.command("run")
@click.option(
    "--backend",
    type=click.Choice(["trio", "asyncio", "uvloop"]),
    default=_default_backend,
    show_default="trio when installed (env MESHCORE_BACKEND)",
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

    name, options = backend, {}
    if backend == "uvloop":
        name, options = "asyncio", {"use_uvloop": True}
    try:
        anyio.run(main, backend=name, backend_options=options)
    except ConfigError as exc:  # a listener could not bind
        click.echo(f"meshcore: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
