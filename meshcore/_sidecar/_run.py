"""`meshcore run` once its command line is parsed: load the config, start the sidecar, serve.

Shared by the click command (`_cli.run_command`) and the entry point's fast path
(`meshcore._main`), which starts a plain `meshcore run` without importing click; so nothing
here imports click.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._backends import run

if TYPE_CHECKING:
    import anyio
    from anyio.streams.memory import MemoryObjectSendStream

__all__ = ["echo_error", "run_sidecar"]

log = logging.getLogger("meshcore.sidecar")


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
    from ._runtime import STOP_SIGNALS, Sidecar

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
        # Listen from before the start: a SIGTERM while the plugins start (an etcd lease
        # granted and its key put) must unwind them, not end the process by default and leave
        # the key behind until its lease expires.
        with anyio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as received:
            send, signals = anyio.create_memory_object_stream[int](16)
            started = anyio.Event()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_relay, received, send, started, tg.cancel_scope)
                    async with sidecar:
                        started.set()
                        echo_error(
                            "meshcore: sidecar ready to accept: "
                            + ", ".join(f"{k} {v}" for k, v in sidecar.addresses.items())
                        )
                        if role is not None:
                            from ._workers import announce, watch_parent

                            announce(role, sidecar.addresses["admin"])
                            tg.start_soon(watch_parent, role)
                        await sidecar.serve(signals)
                    tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The start's own error (a listener that could not bind: one line, exit 2),
                # not a group of one around it.
                if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                    raise group.exceptions[0] from None
                raise

    try:
        run(main, backend)
    except ConfigError as exc:  # a listener could not bind
        echo_error(f"meshcore: error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        pass


async def _relay(
    received: AsyncIterable[int], send: MemoryObjectSendStream[int], started: anyio.Event,
    starting: anyio.CancelScope,
) -> None:
    """The one reader of the process's signals. SIGTERM/SIGINT before `started` cancels
    `starting`: the start unwinds and each plugin undoes what it did (the process exits 0, as
    after a drain). Every other signal goes on to `send`, for `Sidecar.serve`."""
    from ._runtime import STOP_SIGNALS

    async for signum in received:
        if signum in STOP_SIGNALS and not started.is_set():
            log.info("%s during the start: stopping", signal.Signals(signum).name)
            starting.cancel()
            return
        await send.send(signum)


class _Options:
    """The part of the CLI's context the supervisor passes on to its workers."""

    def __init__(self, config_path: str, cli_plugins: list[str]) -> None:
        self.config_path = config_path
        self.cli_plugins = cli_plugins
