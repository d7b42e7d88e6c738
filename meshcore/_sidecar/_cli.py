"""`meshcore run`: the sidecar as a process.

Backend: uvloop where it is installed, else trio, else asyncio (`meshcore._backends`, where
the figures that chose it are cited); `--backend` or MESHCORE_BACKEND picks another.
"""

from __future__ import annotations

from typing import Any

import click

from .._backends import BACKENDS, DEFAULT_HELP, default_backend

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
    from ._run import run_sidecar
    from ._workers import worker_count

    try:
        count = worker_count(workers)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--workers") from None
    run_sidecar(obj.config_path, obj.cli_plugins, backend, log_level, count,
                worker_of, worker_index, worker_dir)
