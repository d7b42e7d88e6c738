"""The pytest plugin (entry point `pytest11`): fixtures for meshcore and plugin authors.

- `anyio_backend`: every `@pytest.mark.anyio` test runs on asyncio and on trio; without trio
  installed the trio run is a skip naming what to install (a failure when
  `MESHCORE_REQUIRE_INTEGRATION=1`). A test about virtual time uses
  `@pytest.mark.parametrize("anyio_backend", [meshcore.testing.virtual_trio()])`.
- `upstream`: a factory of real loopback `UpstreamServer`s, stopped after the test.
- `mesh_factory`: builds a `Mesh` from a dict config, plugin list and inline plugins.
- `require_binary`: the path of an external program, or a skip (a failure when
  `MESHCORE_REQUIRE_INTEGRATION=1`, as CI sets).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .._demo._app import UpstreamServer
from ._helpers import require_binary as _require_binary
from ._helpers import strict_integration

TRIO_MISSING = (
    "trio is not installed, so this test ran on asyncio only: "
    '`pip install "meshcore-servicemesh[trio]"` to run it on trio as well'
)


def require_trio() -> None:
    """Skip the running test when trio is missing (fail it under MESHCORE_REQUIRE_INTEGRATION=1)."""
    if importlib.util.find_spec("trio") is None:
        if strict_integration():
            pytest.fail(f"MESHCORE_REQUIRE_INTEGRATION=1: {TRIO_MISSING}")
        pytest.skip(TRIO_MISSING)


class Backends:
    """Holds the `anyio_backend` fixture. anyio's own pytest plugin defines a fixture of that name
    (asyncio only); between two plugins the one registered last wins, and entry-point plugins
    load in no fixed order, so this is registered from `pytest_configure`, after all of them."""

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> Any:
        """asyncio and trio; a test about virtual time uses `meshcore.testing.virtual_trio()`."""
        if request.param == "trio":
            require_trio()
        return request.param


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Backends(), "meshcore-anyio-backend")


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
