"""Test support for meshcore and for third-party plugin authors.

Installed as a pytest plugin (entry point `pytest11`), so its fixtures are available in any
project that installs meshcore: `anyio_backend` (asyncio and trio), `upstream`,
`mesh_factory`, `require_binary`. Conformance suites per hook family live in
`meshcore.testing.conformance`.
"""

from ._helpers import free_port, require_binary, static_service, strict_integration, virtual_trio
from ._server import Behaviour, UpstreamServer

__all__ = [
    "Behaviour",
    "UpstreamServer",
    "free_port",
    "require_binary",
    "static_service",
    "strict_integration",
    "virtual_trio",
]
