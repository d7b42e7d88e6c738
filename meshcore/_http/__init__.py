"""meshcore's own HTTP/1.1 engine on anyio streams, parsed with httptools.

The client side (`HTTPConnector`) is the terminal's sender: one keep-alive pool per endpoint.
The server side (`serve_http`, `serve_connection`) is what the sidecar's listeners speak.
See docs/data-path.md for why this exists and what it supports.
"""

from ._client import BufferedBody, HTTPConnector, PoolLimits, Timeouts
from ._server import ConnectionInfo, RequestRejected, ServerLimits, serve_connection, serve_http

__all__ = [
    "BufferedBody",
    "ConnectionInfo",
    "HTTPConnector",
    "PoolLimits",
    "RequestRejected",
    "ServerLimits",
    "Timeouts",
    "serve_connection",
    "serve_http",
]
