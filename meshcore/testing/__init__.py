"""Test support for meshcore and for third-party plugin authors.

Installed as a pytest plugin (entry point `pytest11`), so its fixtures are available in any
project that installs meshcore: `anyio_backend` (asyncio and trio), `upstream`,
`mesh_factory`, `require_binary`. Conformance suites per hook family live in
`meshcore.testing.conformance`.
"""

from .._demo._app import Behaviour, UpstreamServer
from ._helpers import (
    free_port,
    raw_upstream,
    require_binary,
    static_service,
    strict_integration,
    virtual_trio,
    wait_listening,
)
from ._scripted import (
    SCRIPTED_PORTS,
    ScriptedConnector,
    SimpleBalancers,
    StateEvents,
    TrackedBody,
    connect_error,
    read_error,
    scripted_mesh,
)

__all__ = [
    "SCRIPTED_PORTS",
    "Behaviour",
    "ScriptedConnector",
    "SimpleBalancers",
    "StateEvents",
    "TrackedBody",
    "UpstreamServer",
    "connect_error",
    "read_error",
    "scripted_mesh",
    "free_port",
    "raw_upstream",
    "require_binary",
    "static_service",
    "strict_integration",
    "virtual_trio",
    "wait_listening",
]
