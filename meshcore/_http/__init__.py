"""meshcore's own HTTP/1.1 engine, parsed with httptools, on trio, asyncio and uvloop.

The client side (`HTTPConnector`) is the terminal's sender: one keep-alive pool per endpoint.
The server side (`serve_http`, `serve_connection`) is what the sidecar's listeners speak.
Module map (docs/data-path.md, "Inside the engine"): `_connector` (the client and its
timeouts), `_pool` (one endpoint's pool), `_http11` (one client connection's exchange),
`_server` (the server and its request cycle), `_bodies` (the chunk iterators), `_socket`
(the socket contract, TLS and the stream adapter), `_loop` (the event loops' internals) and
`_error_map` (I/O errors to mesh errors).
"""

from ._bodies import BufferedBody
from ._connector import HTTPConnector, Timeouts
from ._error_map import RequestRejected
from ._pool import PoolLimits
from ._server import ConnectionInfo, ServerLimits, serve_connection, serve_http

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
