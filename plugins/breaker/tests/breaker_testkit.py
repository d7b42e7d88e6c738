"""Helpers for the breaker plugin's tests (imported by conftest.py and the test modules).

The scripted terminal and the inline balancers come from `meshcore.testing` (see
`ScriptedConnector`): virtual-time tests under trio's MockClock cannot use real sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meshcore.testing import SCRIPTED_PORTS as PORTS  # noqa: F401 - re-exported for the tests
from meshcore.testing import SimpleBalancers as RoundRobin  # noqa: F401
from meshcore.testing import StateEvents as Events  # noqa: F401
from meshcore.testing import connect_error, read_error  # noqa: F401
from meshcore.testing import scripted_mesh as make_scripted_mesh


@pytest.fixture
def scripted_mesh() -> Callable[..., Any]:
    """`scripted_mesh(script, resilience=[...], **tables)` -> (Mesh, ScriptedConnector)."""

    def make(script: Callable[[int, Any, int], Any], resilience: list[str] | None = None,
             plugins: tuple[str, ...] = ("breaker",), extra: tuple = (), **tables: Any) -> Any:
        return make_scripted_mesh(script, resilience or ["breaker"], plugins, extra, **tables)

    return make
