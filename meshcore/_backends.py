"""Which event loop the long-running commands (`meshcore run`, `meshcore demo`) use.

uvloop where it is installed (a dependency on every platform but Windows), else trio, else
asyncio: the engine's figures per backend are in docs/data-path.md ("Default backend for the
sidecar"). `--backend` or the environment variable MESHCORE_BACKEND picks another.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["BACKENDS", "default_backend", "run"]

BACKENDS = ("uvloop", "trio", "asyncio")
DEFAULT_HELP = "uvloop, else trio, whichever is installed (env MESHCORE_BACKEND)"


def default_backend() -> str:
    env = os.environ.get("MESHCORE_BACKEND")
    if env:
        return env
    for name in BACKENDS[:2]:
        try:
            __import__(name)
        except ImportError:
            continue
        return name
    return "asyncio"


def run(main: Callable[[], Awaitable[Any]], backend: str) -> Any:
    """`anyio.run(main)` on `backend`, one of BACKENDS (uvloop is asyncio with its loop)."""
    if backend == "uvloop":
        return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(main, backend=backend)
