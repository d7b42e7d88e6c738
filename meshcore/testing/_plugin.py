"""The pytest plugin (entry point `pytest11`): fixtures for meshcore and plugin authors.

- `anyio_backend`: every `@pytest.mark.anyio` test runs on asyncio and on trio;
  a test about virtual time uses
  `@pytest.mark.parametrize("anyio_backend", [meshcore.testing.virtual_trio()])`.
- `upstream`: a factory of real loopback `UpstreamServer`s, stopped after the test.
- `mesh_factory`: builds a `Mesh` from a dict config, plugin list and inline plugins.
- `require_binary`: the path of an external program, or a skip (a failure when
  `MESHCORE_REQUIRE_INTEGRATION=1`, as CI sets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .._demo._app import UpstreamServer
from ._helpers import require_binary as _require_binary


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """asyncio and trio; a test about virtual time uses `meshcore.testing.virtual_trio()`."""
    return request.param


@pytest.fixture
def upstream() -> Iterator[Callable[..., UpstreamServer]]:
    """`upstream(name="u1", status=200, delay=0, ...)` starts a real server on 127.0.0.1."""
    started: list[UpstreamServer] = []

    def make(name: str | None = None, **behaviour: Any) -> UpstreamServer:
        server = UpstreamServer(name or f"u{len(started) + 1}", **behaviour).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def mesh_factory() -> Callable[..., Any]:
    """`mesh_factory(config_dict, plugins=[...], extra_plugins=[(name, obj)])` -> Mesh."""
    from .. import Mesh

    def make(config: Any = None, plugins: list[str] | None = None, **kwargs: Any) -> Any:
        return Mesh(config, plugins if plugins is not None else [], **kwargs)

    return make


@pytest.fixture
def require_binary() -> Callable[[str], str]:
    return _require_binary
