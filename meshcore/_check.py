"""`meshcore check`: a doctor in the spirit of `linkerd check`.

Each line says what was checked, whether it passed and, when not, what to do about it. The
core checks what it owns (the config, the plugin list, the sidecar's listeners, each service's
discovery); plugins add their own lines through the `meshcore_checks` hook (the tls plugin its
certificates, consul its agent), so the core never names a plugin.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from ._endpoints import Endpoint
    from ._mesh import Mesh

__all__ = ["Check", "CheckProbe", "listener_checks", "resolve_once_all", "run_probes"]


@dataclass(frozen=True)
class Check:
    """One line of `meshcore check`: what was checked, whether it passed, and the fix.

    `title` names the thing checked (`"certificate /etc/mesh/orders.crt"`), `detail` what was
    found (`"valid, 23h 10m left"`), and `fix`, for a failed check, what the user should do.
    """

    title: str
    ok: bool
    detail: str = ""
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CheckProbe = Callable[[], Awaitable["Check | Sequence[Check]"]]
"""What `meshcore_checks` returns a list of: an async callable without arguments."""

# One slow agent or file system must not hang the whole report; 10 s is consul's own default
# connect timeout, so a probe that honours its settings finishes inside it.
PROBE_TIMEOUT = 10.0


async def run_probes(
    probes: Sequence[tuple[str, CheckProbe]], timeout: float = PROBE_TIMEOUT
) -> list[tuple[str, Check]]:
    """Run each (source, probe) concurrently; results keep the probes' order.

    A probe that raises or overruns `timeout` becomes a failed line naming its source, so
    one broken plugin check cannot hide the others.
    """
    results: list[list[tuple[str, Check]]] = [[] for _ in probes]

    async def one(i: int, source: str, probe: CheckProbe) -> None:
        found: Check | Sequence[Check] | None = None
        with anyio.move_on_after(timeout):
            try:
                found = await probe()
            except Exception as exc:  # noqa: BLE001 - reported as a failed line
                found = Check(
                    f"{source} check", False, f"{type(exc).__name__}: {exc}",
                    f"a bug in plugin {source!r}'s meshcore_checks; run with --debug and report it",
                )
        if found is None:
            found = Check(f"{source} check", False, f"gave no answer within {timeout:g} s",
                          "see whether what it checks is reachable")
        checks = [found] if isinstance(found, Check) else list(found)
        results[i] = [(source, c) for c in checks]

    async with anyio.create_task_group() as tg:
        for i, (source, probe) in enumerate(probes):
            tg.start_soon(one, i, source, probe)
    return [item for group in results for item in group]


def listener_checks(listeners: Iterable[tuple[str, Any]]) -> list[Check]:
    """Whether each (name, Address) listener of the sidecar could bind now.

    Binds with SO_REUSEADDR as the sidecar's listeners do, so a port in TIME_WAIT counts as
    free and only a port someone listens on counts as taken. Port 0 (any free port) passes.
    """
    checks = []
    for name, address in listeners:
        title = f"listener {name} {address}"
        key = f"[sidecar] {name}"
        if address.port == 0:
            checks.append(Check(title, True, "port 0: a free port is picked at start"))
            continue
        try:
            _try_bind(address.host, address.port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                detail = "the port is in use"
                fix = (f"stop the process listening there (`ss -ltnp 'sport = :{address.port}'` "
                       f"shows it), or set {key} = \"host:port\" in the config")
            elif exc.errno == errno.EACCES:
                detail = "permission denied (ports below 1024 need privileges)"
                fix = f"use a port ≥ 1024 in {key}"
            elif exc.errno == errno.EADDRNOTAVAIL:
                detail = "the address is not one of this machine's"
                fix = f"set {key} to a local address (127.0.0.1, 0.0.0.0)"
            else:
                detail = f"cannot bind: {exc.strerror or exc}"
                fix = f"check {key}"
            checks.append(Check(title, False, detail, fix))
        else:
            checks.append(Check(title, True, "free"))
    return checks


def _try_bind(host: str, port: int) -> None:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, type_, proto, _, sockaddr in infos:
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)


async def resolve_once_all(mesh: Mesh) -> list[tuple[str, str, list[Endpoint] | BaseException | None]]:
    """(service, discovery kind, result) for each service: its endpoints from the discovery's
    optional `resolve_once()` (a convention, not a hook: a Discovery may offer
    `async def resolve_once(self) -> list[Endpoint]`), the error it raised, or None when the
    discovery cannot resolve ahead of time."""
    results: list[tuple[str, str, list[Endpoint] | BaseException | None]] = []
    for name, svc in mesh.config.services.items():
        try:
            discovery = mesh.plugins.discovery(svc.discovery, svc.settings_for(svc.discovery), name)
            resolve_once = getattr(discovery, "resolve_once", None)
            if resolve_once is None:
                results.append((name, svc.discovery, None))
                continue
            results.append((name, svc.discovery, list(await resolve_once())))
        except Exception as exc:  # noqa: BLE001 - reported per service
            results.append((name, svc.discovery, exc))
    return results
