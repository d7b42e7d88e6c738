"""`meshcore run` once its command line is parsed: load the config, start the sidecar, serve.

Shared by the click command (`_cli.run_command`) and the entry point's fast path
(`meshcore._main`), which starts a plain `meshcore run` without importing click; so nothing
here imports click.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .._backends import run

__all__ = ["echo_error", "run_sidecar"]


def echo_error(message: str) -> None:
    """What `click.echo(message, err=True)` writes."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def run_sidecar(
    config_path: str, cli_plugins: Sequence[str], backend: str, log_level: str, count: int,
    worker_of: int | None = None, worker_index: int | None = None, worker_dir: str | None = None,
) -> None:
    """Run the sidecar until it drains; `count` > 1 runs the supervisor of that many workers.

    `cli_plugins` are the `-p` values (empty: the config's plugin list); `worker_*` are the
    hidden options a supervisor starts each worker with. Exits 2 with the error when the config,
    a plugin or a listener fails.
    """
    import anyio

    from .._config import MeshConfig
    from .._errors import ConfigError, PluginError
    from ._runtime import Sidecar

    role = None
    if worker_of is not None and worker_index is not None and worker_dir is not None:
        from ._workers import WorkerRole  # a worker of `--workers N`, not a lone sidecar

        # A SIGHUP relayed before this worker listens for it must not end it (the default).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        role = WorkerRole(worker_index, Path(worker_dir), worker_of)

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = MeshConfig.load(config_path)
        sidecar = Sidecar(config, list(cli_plugins) or None, config_path=config_path, worker=role)
        if role is None and count > 1:
            from ._supervisor import supervise

            obj = _Options(config_path, list(cli_plugins))
            sys.exit(supervise(sidecar, count, obj, backend, log_level, config.source))
    except (ConfigError, PluginError) as exc:
        echo_error(f"meshcore: error: {exc}")
        sys.exit(2)

    async def main() -> None:
        async with sidecar:
            echo_error(
                "meshcore: sidecar ready to accept: "
                + ", ".join(f"{k} {v}" for k, v in sidecar.addresses.items())
            )
            if role is None:
                await sidecar.serve()
                return
            from ._workers import announce, watch_parent

            announce(role, sidecar.addresses["admin"])
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_parent, role)
                await sidecar.serve()
                tg.cancel_scope.cancel()

    try:
        run(main, backend)
    except ConfigError as exc:  # a listener could not bind
        echo_error(f"meshcore: error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        pass


class _Options:
    """The part of the CLI's context the supervisor passes on to its workers."""

    def __init__(self, config_path: str, cli_plugins: list[str]) -> None:
        self.config_path = config_path
        self.cli_plugins = cli_plugins
