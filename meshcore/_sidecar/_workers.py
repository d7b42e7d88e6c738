"""The worker side of `meshcore run --workers N`: one Sidecar among N processes.

A worker is the ordinary Sidecar with three differences (`WorkerRole`): its proxying listeners
set SO_REUSEPORT so every worker accepts on the same ports (the kernel spreads new connections
across them), its admin listener is a private one on an ephemeral loopback port that only the
supervisor reads, and only worker 0 registers the instance. Nothing is shared on the request
path: each worker has its own mesh, balancer state, pools and counters, as Envoy's workers keep
per-thread balancer state. How the supervisor finds a worker's admin port: the worker writes
`worker-<index>.json` (its pid and port) into the supervisor's private directory once it is up.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ._settings import Address

__all__ = ["WorkerRole", "announce", "announcement", "read_announcement", "watch_parent", "worker_count"]

log = logging.getLogger("meshcore.sidecar")

# How often a worker checks that its supervisor still lives: an orphaned worker drains and
# exits within this, and a check is one getppid() call.
_PARENT_CHECK = 1.0


def worker_count(text: str) -> int:
    """`--workers`: a positive number, or `auto` (the cores this process may run on)."""
    if text == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a number of workers (1 or more) or 'auto', got {text!r}")
    return int(text)


@dataclass(frozen=True)
class WorkerRole:
    """Worker `index` of a group run by the supervisor with pid `parent`."""

    index: int
    directory: Path
    parent: int
    overrides: dict[str, Address] = field(
        default_factory=lambda: {"admin": Address("127.0.0.1", 0)}
    )

    @property
    def registers(self) -> bool:
        return self.index == 0


def announcement(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.json"


def announce(role: WorkerRole, admin: Address) -> None:
    """Tell the supervisor where this worker's admin listener is (written whole, then renamed,
    so a reader never sees half a file)."""
    import json  # only workers and their supervisor use it: not at a plain sidecar's start

    path = announcement(role.directory, role.index)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "admin": admin.port}))
    os.replace(tmp, path)


def read_announcement(directory: Path, index: int) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads(announcement(directory, index).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def watch_parent(role: WorkerRole) -> None:
    """Drain (as on SIGTERM) once the supervisor is gone, instead of serving on as an orphan."""
    while os.getppid() == role.parent:
        await anyio.sleep(_PARENT_CHECK)
    log.warning("worker %d: supervisor %d is gone; draining", role.index, role.parent)
    os.kill(os.getpid(), signal.SIGTERM)
