"""`meshcore run`: the sidecar as a process.

Backend: uvloop where it is installed, else trio, else asyncio (`meshcore._backends`, where
the figures that chose it are cited); `--backend` or MESHCORE_BACKEND picks another.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
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
@click.option("--workers", default="1", show_default=True, metavar="N|auto",
              help="Worker processes accepting on the same ports (SO_REUSEPORT); "
                   "auto = one per core. See docs/sidecar.md, Workers.")
@click.option("--worker-of", type=int, default=None, hidden=True)
@click.option("--worker-index", type=int, default=None, hidden=True)
@click.option("--worker-dir", type=click.Path(file_okay=False), default=None, hidden=True)
@click.pass_obj
def run_command(
    obj: Any, backend: str, log_level: str, workers: str,
    worker_of: int | None, worker_index: int | None, worker_dir: str | None,
) -> None:
    """Run the sidecar: outbound, inbound and admin listeners around the mesh.

    SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config file.
    """
    import anyio

    from .._config import MeshConfig
    from .._errors import ConfigError, PluginError
    from ._runtime import Sidecar
    from ._workers import WorkerRole, announce, watch_parent, worker_count

    try:
        count = worker_count(workers)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--workers") from None
    role = None
    if worker_of is not None and worker_index is not None and worker_dir is not None:
        # A SIGHUP relayed before this worker listens for it must not end it (the default).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        role = WorkerRole(worker_index, Path(worker_dir), worker_of)

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = MeshConfig.load(obj.config_path)
        sidecar = Sidecar(
            config, list(obj.cli_plugins) or None, config_path=obj.config_path, worker=role
        )
        if role is None and count > 1:
            from ._supervisor import supervise

            sys.exit(supervise(sidecar, count, obj, backend, log_level, config.source))
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
            if role is None:
                await sidecar.serve()
                return
            announce(role, sidecar.addresses["admin"])
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_parent, role)
                await sidecar.serve()
                tg.cancel_scope.cancel()

    try:
        run(main, backend)
    except ConfigError as exc:  # a listener could not bind
        click.echo(f"meshcore: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
