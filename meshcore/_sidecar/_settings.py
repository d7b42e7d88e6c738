"""The `[sidecar]` section: listener addresses, the local app, limits, timeouts and drain.

Default numbers and where they come from:

- ports 15001 (outbound), 15006 (inbound), 15000 (admin): Istio's sidecar uses the same three
  (Envoy's outbound capture port, inbound capture port, admin port), so operators recognise them.
- limits: nginx `large_client_header_buffers 4 8k` (request line 8 KiB), Envoy
  `max_headers_count` 100 and `max_request_headers_kb` 60; timeouts nginx
  `client_header_timeout 60s`, `keepalive_timeout 75s`, `client_body_timeout 60s`,
  `send_timeout 60s` (the engine's `ServerLimits`).
- max_connections 1024 per listener: Envoy's default circuit-breaker `max_connections`.
- max_pending_connections 256 per listener: a quarter of `max_connections`, so connections
  that never finish a handshake or a first request head can hold at most a quarter of the
  slots; over it the oldest pending one is closed (see _listeners.py and docs/security.md).
  A peer finishes its handshake and head within a round trip, so it leaves the pending set
  long before 256 newer connections could push it out.
- retry_buffer 64 KiB: Linkerd never retries requests whose body is larger than 64 KiB, so the
  sidecar holds a body in memory (making it replayable) only up to that size and streams larger
  ones.
- path_normalization BASE, path_with_escaped_slashes_action REJECT_REQUEST: Istio's secure
  defaults after CVE-2021-31920 / CVE-2021-39156 (see meshcore/_paths.py, docs/sidecar.md).
- headers_with_underscores_action DROP_HEADER: nginx's default (`underscores_in_headers off`
  ignores such fields), so a client cannot spell a sidecar-set header `X_Forwarded_Client_Cert`
  and have a WSGI/CGI app read it as the sidecar's; a request is still answered, unlike Envoy's
  REJECT_REQUEST, since legitimate clients that send such names lose only those fields.
- dashboard_bucket 10 s x dashboard_points 90: the last 15 minutes, at Prometheus' usual
  scrape interval (docs/dashboard.md gives the memory this costs).
- drain 20 s: below Kubernetes' default 30 s termination grace period, so a drain that uses its
  whole deadline still ends with exit 0 rather than a SIGKILL (Istio's own
  `terminationDrainDuration` is 5 s; ours waits for in-flight requests, not a fixed time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._paths import ESCAPED_SLASH_ACTIONS, PATH_NORMALIZATIONS
from .._settings import Setting

if TYPE_CHECKING:
    from .._http import ServerLimits

UNDERSCORE_ACTIONS = ("DROP_HEADER", "REJECT_REQUEST", "ALLOW")

__all__ = [
    "SETTINGS",
    "UNDERSCORE_ACTIONS",
    "Address",
    "parse_address",
    "parse_listen_address",
    "server_limits",
]


@dataclass(frozen=True)
class Address:
    """A listener or app address: host and port (port 0 = any free port, for tests), or the
    `path` of a UNIX socket (`"unix:/run/mesh/outbound.sock"`, outbound only)."""

    host: str
    port: int
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return bool(self.path) or self.host in ("localhost", "::1") or self.host.startswith("127.")


def parse_address(text: Any) -> Address:
    """`"host:port"`, `"[v6]:port"` or `":port"` (all interfaces) to an Address."""
    if not isinstance(text, str):
        raise ValueError(f'expected "host:port", got {text!r}')
    if text.startswith("unix:"):
        raise ValueError(f'expected "host:port" (a UNIX socket only for outbound), got {text!r}')
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
        host = host or "0.0.0.0"
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f'expected "host:port" (port 0-65535), got {text!r}')
    return Address(host, int(port_text))


def parse_listen_address(text: Any) -> Address:
    """What `parse_address` takes, or `"unix:/absolute/path"` for a UNIX socket."""
    if isinstance(text, str) and text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f'expected "unix:/absolute/path", got {text!r}')
        return Address("", 0, path)
    return parse_address(text)


def _optional_address(text: Any) -> Address | None:
    return None if text == "" else parse_address(text)


def _address(default: str, help: str) -> Setting:
    return Setting("str", parse_address(default), help, convert=parse_address)


SETTINGS: dict[str, Setting] = {
    "service": Setting(
        "str", "", "name of the local service: registered with discovery, used in metrics"
    ),
    "app": _address("127.0.0.1:8080", "the local application the inbound listener forwards to"),
    "outbound": Setting(
        "str", parse_address("127.0.0.1:15001"), 'listener the local app sends mesh requests to '
        '("host:port", or "unix:/path" for a UNIX socket)', convert=parse_listen_address,
    ),
    "outbound_mode": Setting(
        "int", 0o660, "file mode of a UNIX-socket outbound listener (who may send as this "
        "workload)", min=0, max=0o777
    ),
    "outbound_uids": Setting(
        "list[int]", [], "UNIX-socket outbound only: user ids allowed to connect, checked with "
        "SO_PEERCRED (empty = whoever the file mode lets in)"
    ),
    "inbound": _address("0.0.0.0:15006", "listener other sidecars reach this service on"),
    "advertise": Setting(
        "str",
        None,
        'address registered for this instance ("host:port"; default: the inbound address, '
        "with 127.0.0.1 for an all-interfaces host)",
        convert=_optional_address,
    ),
    "admin": _address("127.0.0.1:15000", "health, metrics and state listener"),
    "admin_hosts": Setting(
        "list[str]", [], "Host names the admin listener answers besides localhost and IP "
        "literals (any other Host is refused: DNS rebinding)"
    ),
    "path_normalization": Setting(
        "str", "BASE", "inbound path normalization before authorization and forwarding "
        "(Istio's meshConfig.pathNormalization)", choices=PATH_NORMALIZATIONS
    ),
    "path_with_escaped_slashes_action": Setting(
        "str", "REJECT_REQUEST", "inbound paths with %2F or %5C (Envoy's "
        "path_with_escaped_slashes_action)", choices=ESCAPED_SLASH_ACTIONS
    ),
    "headers_with_underscores_action": Setting(
        "str", "DROP_HEADER", "inbound header names with '_' (Envoy's "
        "headers_with_underscores_action)", choices=UNDERSCORE_ACTIONS
    ),
    "admin_peers": Setting(
        "list[str]", [], 'admin listeners of other sidecars ("host:port") whose view the '
        "dashboard merges into its topology (endpoints with `admin` metadata are added)",
        convert=lambda v: tuple(parse_address(a) for a in v),
    ),
    "admin_peer_timeout": Setting(
        "duration", 1.0, "how long the dashboard waits for one peer's /dashboard.json", min=0.001
    ),
    "dashboard_bucket": Setting(
        "duration", 10.0, "width of one point of the dashboard's in-memory time series (on restart)", min=0.01
    ),
    "dashboard_points": Setting(
        "int", 90, "points kept per series (90 x 10 s = the last 15 minutes; on restart)", min=2, max=8640
    ),
    "admin_bind_any": Setting(
        "bool", False, "allow the admin listener on a non-loopback address (it is unauthenticated)"
    ),
    "drain": Setting(
        "duration", 20.0, "on SIGTERM, how long in-flight requests may take to finish", min=0
    ),
    "max_connections": Setting("int", 1024, "open connections per listener", min=1),
    "max_pending_connections": Setting(
        "int", 256, "connections per listener that have not yet sent a whole first request "
        "head (or finished their TLS handshake); over it the oldest such one is closed", min=1
    ),
    "max_request_line": Setting("int", 8192, "longest request target, bytes", min=64),
    "max_header_count": Setting("int", 100, "most header fields in one request", min=1),
    "max_header_bytes": Setting("int", 61440, "largest request head, bytes", min=256),
    "max_body": Setting("int", 0, "largest request body, bytes (0 = unlimited)", min=0),
    "header_timeout": Setting(
        "duration", 60.0, "time to receive a whole request head (slowloris guard)", min=0.001
    ),
    "idle_timeout": Setting("duration", 75.0, "keep-alive connection idle time", min=0.001),
    "body_timeout": Setting("duration", 60.0, "longest pause inside a request body", min=0.001),
    "write_timeout": Setting("duration", 60.0, "longest stall writing a response", min=0.001),
    "app_connect_timeout": Setting("duration", 5.0, "connect timeout to the local app", min=0.001),
    "app_read_timeout": Setting(
        "duration", 60.0, "longest pause while reading the local app's response", min=0.001
    ),
    # Probing the local app for registration (see _health.py for the defaults' reasoning).
    "app_health_interval": Setting(
        "duration", 5.0, "how often the local app is probed (0 = never; registration then "
        "always reports passing)", min=0
    ),
    "app_health_path": Setting(
        "str", "", "HTTP path probed with GET, expecting 2xx/3xx (empty = a TCP connect)"
    ),
    "app_health_timeout": Setting("duration", 1.0, "how long one probe may take", min=0.001),
    "app_unhealthy_after": Setting(
        "int", 2, "failed probes in a row before the instance is reported critical", min=1
    ),
    "retry_buffer": Setting(
        "int", 65536, "request bodies up to this size are held so a retry can resend them", min=0
    ),
}


def server_limits(settings: Any) -> ServerLimits:
    # Imported here: this module is loaded with the plugin list (`meshcore --help` too), the
    # engine only when a sidecar starts.
    from .._http import ServerLimits

    return ServerLimits(
        max_request_line=settings.max_request_line,
        max_header_count=settings.max_header_count,
        max_header_bytes=settings.max_header_bytes,
        max_body=settings.max_body or None,
        header_timeout=settings.header_timeout,
        idle_timeout=settings.idle_timeout,
        body_timeout=settings.body_timeout,
        write_timeout=settings.write_timeout,
    )


def advertised(settings: Any, inbound: Address) -> Address:
    """Where other instances reach this one: `advertise`, else the bound inbound address."""
    if settings.advertise is not None:
        advertise: Address = settings.advertise
        return advertise
    host = inbound.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return Address(host, inbound.port)
