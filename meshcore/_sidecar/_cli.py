"""`meshcore run`: the sidecar as a process.

Backend: uvloop by default where it is installed (every platform but Windows), else trio,
else asyncio. Measured on this project's machines with the engine's direct socket calls
(`bench/sidecar.py`, `bench/engine_proxy.py`; figures in docs/data-path.md), one sidecar
with round-robin, retry and breaker costs about 72 µs of CPU per request on uvloop, 73 on
asyncio and 98 on trio, and the bare engine 33-41 µs on uvloop against 52-58 on trio.
`--backend` or the environment variable MESHCORE_BACKEND picks another.
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
    for name in ("uvloop", "trio"):
        try:
            __import__(name)
        except ImportError:
            continue
        return name
    return "asyncio"


@click.command("run")
@click.option(
    "--backend",
    type=click.Choice(["trio", "asyncio", "uvloop"]),
    default=_default_backend,
    show_default="uvloop, else trio, whichever is installed (env MESHCORE_BACKEND)",
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
