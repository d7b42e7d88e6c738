"""The supervisor of `meshcore run --workers N`: spawns the workers, restarts them, relays
signals, and answers the one admin listener for the whole group.

It binds nothing on the data path: each worker (`_workers`) accepts on the proxying ports
itself with SO_REUSEPORT. The supervisor binds the configured admin address and reads each
worker's private admin listener (an ephemeral loopback port the worker announces in a private
directory) when asked:

- /ready: 200 when every worker is up and ready (and the group is not draining);
- /metrics: counters and histograms summed across workers; the gauges that add up (open
  connections, requests in flight, per-endpoint in flight, resident memory) summed; every
  other gauge (config generation, breaker state, endpoints, snapshot age, plugin state) is per
  worker state, so it keeps one sample per worker with a `worker` label. Plus the group's
  own: `meshcore_workers`, `meshcore_workers_up`, `meshcore_worker_restarts_total`;
- /state: each worker's /state under `workers`, and `merged` (summed telemetry, the union of
  services, the generations in use);
- / and /dashboard.json: the dashboard over the workers' views merged (`merge_views`), with
  the peers fetched once for the group.

SIGHUP is relayed to every worker (each reloads the file itself; one that refuses keeps its
old generation, visible in `merged.generations`). SIGTERM/SIGINT: /ready turns 503, every worker
gets SIGTERM and drains; the supervisor exits 0 once all have exited (SIGKILL after the drain
deadline plus a grace). A worker that exits on its own is restarted, with backoff, and counted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from .._endpoints import Endpoint
from .._errors import ConfigError, MeshError
from .._http import HTTPConnector, PoolLimits, Timeouts, serve_connection
from .._models import Request, Response
from ._admin import refuse
from ._dashboard import Peers, add_peers, merge_views, page
from ._settings import Address
from ._workers import read_announcement

__all__ = ["Supervisor", "merge_metrics", "merge_state", "supervise"]

log = logging.getLogger("meshcore.sidecar")


@dataclass(frozen=True)
class _Answer:
    """A worker's answer to one admin request, read whole."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

# Restart backoff, the shape of Kubernetes' CrashLoopBackOff (doubling, capped, reset after a
# quiet run) scaled down, since a worker starts in well under a second: the first restart is
# immediate, then 0.5 s doubling to 30 s; a worker that ran 60 s starts the count again.
_BACKOFF = 0.5
_BACKOFF_MAX = 30.0
_STABLE = 60.0
# After the drain deadline, how long the workers get to exit before SIGKILL.
_EXIT_GRACE = 5.0
# Gauges whose values add up across workers; other gauges are labelled by worker.
SUMMED_GAUGES = frozenset({
    "meshcore_sidecar_connections_open",
    "meshcore_sidecar_requests_in_flight",
    "meshcore_endpoint_in_flight",
    "process_resident_memory_bytes",
})
_SUMMED_KINDS = frozenset({"counter", "histogram", "summary"})


@dataclass
class Slot:
    """One worker position: the process in it now, and how often it was restarted."""

    index: int
    process: anyio.abc.Process | None = None
    restarts: int = 0
    last_exit: int | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


def _text(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(
        status,
        [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")],
        body.encode(),
    )


class Supervisor:
    """Runs `count` workers, each started with `command(index, directory)`."""

    def __init__(
        self,
        count: int,
        admin: Address,
        command: Callable[[int, Path], Sequence[str]],
        *,
        drain: float,
        source: str = "<config>",
        admin_hosts: Sequence[str] = (),
        admin_peers: Sequence[Address] = (),
        admin_peer_timeout: float = 1.0,
    ) -> None:
        self.count = count
        self.admin_hosts = tuple(admin_hosts)
        self.admin_peers = tuple(admin_peers)
        self.admin_peer_timeout = admin_peer_timeout
        self.peers = Peers()
        self.slots: list[Slot] = []
        self.admin = admin
        self.command = command
        self.drain = drain
        self.source = source
        self.stopping = False
        self.fatal: str | None = None
        self.directory = Path(".")
        self.started = time.time()
        self.address: Address | None = None
        self._stop: anyio.Event | None = None
        self._client: HTTPConnector | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[Address], None] = lambda a: None) -> int:
        """Serve until SIGTERM/SIGINT; the exit code (0, or 2 when a worker could not start)."""
        # Listen from the start: a SIGTERM before the workers are up still stops them in order.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            return await self._run(signals, on_ready)

    async def _run(self, signals: Any, on_ready: Callable[[Address], None]) -> int:
        self._stop = anyio.Event()
        self.slots = [Slot(i) for i in range(self.count)]
        try:
            listener = await anyio.create_tcp_listener(
                local_host=self.admin.host, local_port=self.admin.port, backlog=128
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.admin}: {exc.strerror or exc}",
                source=self.source, path="sidecar.admin",
            ) from None
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.address = Address(self.admin.host, port)
        with tempfile.TemporaryDirectory(prefix="meshcore-workers-") as directory:
            self.directory = Path(directory)
            # meshcore's own client, not httpx: the supervisor stays as light as a worker (no
            # proxy from the environment can sit between it and loopback either).
            client_cm = HTTPConnector(
                limits=PoolLimits(max_connections=4),
                timeouts=Timeouts(connect=5.0, read=5.0, write=5.0, pool=5.0),
            )
            async with client_cm as client, anyio.create_task_group() as tg:
                self._client = client
                tg.start_soon(self._serve_admin, listener, tg)
                for slot in self.slots:
                    tg.start_soon(self._keep, slot)
                tg.start_soon(self._signals, signals)
                on_ready(self.address)
                await self._stopped().wait()
                await self._stop_workers()
                log.info("workers stopped: %s", ", ".join(
                    f"{s.index} exit {s.last_exit}" for s in self.slots))
                tg.cancel_scope.cancel()
        return 2 if self.fatal else 0

    def _stopping(self) -> bool:
        """`stopping`, read afresh after an await (another task sets it)."""
        return self.stopping

    def _stopped(self) -> anyio.Event:
        assert self._stop is not None, "the supervisor is running"
        return self._stop

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading %d workers", len(self.slots))
                self._send_all(signal.SIGHUP)
                continue
            log.info("%s: draining %d workers", signal.Signals(signum).name, len(self.slots))
            self.stopping = True
            self._stopped().set()
            return

    def _send_all(self, signum: signal.Signals) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                try:
                    slot.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def _stop_workers(self) -> None:
        self.stopping = True
        self._send_all(signal.SIGTERM)
        with anyio.move_on_after(self.drain + _EXIT_GRACE):
            for slot in self.slots:
                await slot.done.wait()
            return
        log.warning("workers still running %.1f s after SIGTERM: killing them", self.drain + _EXIT_GRACE)
        self._send_all(signal.SIGKILL)
        with anyio.move_on_after(_EXIT_GRACE):
            for slot in self.slots:
                await slot.done.wait()

    async def _keep(self, slot: Slot) -> None:
        """Run the worker in `slot`, restarting it whenever it exits on its own."""
        failures = 0
        try:
            while not self.stopping:
                began = time.monotonic()
                process = await anyio.open_process(
                    list(self.command(slot.index, self.directory)),
                    stdin=subprocess.DEVNULL, stdout=None, stderr=None,
                    # Its own session: a terminal's Ctrl-C reaches the supervisor only, which
                    # then drains the workers in order.
                    start_new_session=True,
                )
                slot.process = process
                if self._stopping():  # SIGTERM came while it was being spawned
                    process.send_signal(signal.SIGTERM)
                code = await process.wait()
                announced = read_announcement(self.directory, slot.index)
                was_up = announced is not None and announced.get("pid") == process.pid
                slot.process = None
                slot.last_exit = code
                if self._stopping():
                    break
                if code == 2 and not was_up and slot.restarts == 0:
                    # A config or bind error on first start: restarting cannot fix it.
                    self.fatal = f"worker {slot.index} could not start (exit 2)"
                    log.error("%s", self.fatal)
                    self._stopped().set()
                    break
                slot.restarts += 1
                failures = failures + 1 if time.monotonic() - began < _STABLE else 1
                delay = 0.0 if failures <= 1 else min(_BACKOFF * 2 ** (failures - 2), _BACKOFF_MAX)
                log.warning("worker %d (pid %d) exited with %s; restart %d in %.1f s",
                            slot.index, process.pid, code, slot.restarts, delay)
                with anyio.move_on_after(delay):
                    await self._stopped().wait()
        finally:
            slot.done.set()

    # -- admin --------------------------------------------------------------------------------

    async def _serve_admin(self, listener: Any, tg: anyio.abc.TaskGroup) -> None:
        async def connection(stream: Any) -> None:
            await serve_connection(stream, self._handle)

        async with listener:
            await listener.serve(connection, task_group=tg)

    async def _fetch(self, slot: Slot, path: str) -> _Answer | None:
        """`path` from the worker's private admin listener; None when it is not up."""
        process = slot.process
        announced = read_announcement(self.directory, slot.index)
        if process is None or announced is None or announced.get("pid") != process.pid:
            return None
        assert self._client is not None
        port = announced["admin"]
        request = Request("GET", f"http://127.0.0.1:{port}{path}", [(b"host", f"127.0.0.1:{port}".encode())])
        try:
            with anyio.fail_after(5.0):
                response = await self._client.send(Endpoint("127.0.0.1", port), request)
                return _Answer(response.status_code, await response.aread())
        except (MeshError, OSError, TimeoutError):
            return None

    async def _gather(self, path: str) -> list[_Answer | None]:
        results: list[_Answer | None] = [None] * len(self.slots)

        async def one(slot: Slot) -> None:
            results[slot.index] = await self._fetch(slot, path)

        async with anyio.create_task_group() as tg:
            for slot in self.slots:
                tg.start_soon(one, slot)
        return results

    async def _handle(self, request: Request, info: Any) -> Response:
        refused = refuse(request, self.admin_hosts)  # as a single sidecar's admin
        if refused is not None:
            return refused
        path = request.url.path
        if path == "/live":
            return _text(200, "live\n")
        if path == "/ready":
            if self.stopping:
                return _text(503, "not ready: draining\n")
            answers = await self._gather("/ready")
            waiting = [i for i, r in enumerate(answers) if r is None or r.status_code != 200]
            if waiting:
                return _text(503, f"not ready: workers {', '.join(map(str, waiting))} not ready\n")
            return _text(200, "ready\n")
        if path in ("/metrics", "/stats/prometheus"):
            answers = await self._gather("/metrics")
            texts = [r.text if r is not None and r.status_code == 200 else None for r in answers]
            return _text(200, merge_metrics(texts) + self._own_metrics(texts),
                         "text/plain; version=0.0.4; charset=utf-8")
        if path == "/state":
            answers = await self._gather("/state")
            states = [r.json() if r is not None and r.status_code == 200 else None for r in answers]
            body = json.dumps(self.state(states), indent=2, default=str, sort_keys=True) + "\n"
            return _text(200, body, "application/json")
        if path == "/dashboard.json":
            answers = await self._gather("/dashboard.json?peers=0")
            view = merge_views([r.json() if r is not None and r.status_code == 200 else None for r in answers])
            if "peers=0" not in request.url.query.split("&"):
                await add_peers(view, self.peers, self.admin_peers, str(self.address),
                                self.admin_peer_timeout)
            return _text(200, json.dumps(view, default=str) + "\n", "application/json")
        if path == "/":  # the dashboard, over the group's /dashboard.json
            return Response(200, [(b"content-type", b"text/html; charset=utf-8"),
                                  (b"cache-control", b"no-store")], page())
        return _text(404, f"not found: {path} (try /live, /ready, /metrics, /state, /dashboard.json)\n")

    def _own_metrics(self, texts: Sequence[str | None]) -> str:
        lines = [
            "# HELP meshcore_workers Workers configured (--workers).",
            "# TYPE meshcore_workers gauge",
            f"meshcore_workers {len(self.slots)}",
            "# HELP meshcore_workers_up Workers whose admin listener answered this scrape.",
            "# TYPE meshcore_workers_up gauge",
            f"meshcore_workers_up {sum(t is not None for t in texts)}",
            "# HELP meshcore_worker_restarts_total Workers restarted after exiting on their own, by worker.",
            "# TYPE meshcore_worker_restarts_total counter",
        ]
        lines += [f'meshcore_worker_restarts_total{{worker="{s.index}"}} {s.restarts}' for s in self.slots]
        return "\n".join(lines) + "\n"

    def state(self, states: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        workers = []
        for slot, state in zip(self.slots, states):
            workers.append({
                "index": slot.index,
                "pid": slot.process.pid if slot.process is not None else None,
                "up": state is not None,
                "restarts": slot.restarts,
                "last_exit": slot.last_exit,
                "state": state,
            })
        return {
            "supervisor": {
                "pid": os.getpid(),
                "started": self.started,
                "uptime": time.time() - self.started,
                "workers": len(self.slots),
                "draining": self.stopping,
                "restarts": sum(s.restarts for s in self.slots),
                "admin": str(self.address),
            },
            "workers": workers,
            "merged": merge_state(states),
        }


# ------------------------------------------------------------------------------------------
# Merging what the workers report


@dataclass
class _Family:
    help: str = ""
    kind: str = "untyped"
    samples: dict[tuple[str, str], float] = field(default_factory=dict)


def _parse(text: str) -> dict[str, _Family]:
    """Prometheus text (0.0.4) to families in order; samples keyed by (name, label text)."""
    families: dict[str, _Family] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name, _, rest = line[7:].partition(" ")
            family = families.setdefault(name, _Family())
            if line[2] == "H":
                family.help = rest
            else:
                family.kind = rest.strip()
            current = name
            continue
        if not line.strip() or line.startswith("#"):
            continue
        head, _, value = line.rstrip().rpartition(" ")
        name, brace, labels = head.partition("{")
        # A histogram's _bucket/_sum/_count samples belong to the family named before them.
        owner = current if current and name.startswith(current) else name
        try:
            number = float(value)
        except ValueError:
            continue
        families.setdefault(owner, _Family()).samples[(name, brace + labels)] = number
    return families


def _with_worker(labels: str, index: int) -> str:
    inner = labels[1:-1] if labels else ""
    return "{" + f'worker="{index}"' + ("," + inner if inner else "") + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer():
        return str(int(value))
    return repr(value)


def merge_metrics(texts: Sequence[str | None]) -> str:
    """One page from each worker's /metrics (None: a worker that did not answer): counters,
    histograms and SUMMED_GAUGES summed; other gauges one sample per worker (`worker` label)."""
    merged: dict[str, _Family] = {}
    for index, text in enumerate(texts):
        if text is None:
            continue
        for name, family in _parse(text).items():
            out = merged.setdefault(name, _Family(family.help, family.kind))
            summed = family.kind in _SUMMED_KINDS or name in SUMMED_GAUGES
            for (sample, labels), value in family.samples.items():
                key = (sample, labels) if summed else (sample, _with_worker(labels, index))
                out.samples[key] = out.samples.get(key, 0.0) + value
    lines: list[str] = []
    for name, family in merged.items():
        lines.append(f"# HELP {name} {family.help}")
        lines.append(f"# TYPE {name} {family.kind}")
        lines += [f"{s}{labels} {_number(v)}" for (s, labels), v in family.samples.items()]
    return "\n".join(lines) + "\n" if lines else ""


def _sum(a: Any, b: Any) -> Any:
    """Counters from two workers added: numbers summed, dicts by key, `[{labels, value}]` by
    labels; anything else keeps the first."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _sum(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list) and all(
        isinstance(x, dict) and "labels" in x for x in a + b
    ):
        out: dict[tuple[Any, ...], Any] = {}
        for item in a + b:
            key = tuple(item["labels"])
            out[key] = _sum(out[key], item["value"]) if key in out else item["value"]
        return [{"labels": list(k), "value": v} for k, v in sorted(out.items())]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a + b
    return a


def merge_state(states: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """What the group as a whole is doing, from each worker's /state (None: not up)."""
    up = [s for s in states if s is not None]
    sidecars = [s.get("sidecar", {}) for s in up]
    telemetry: Any = {}
    for s in sidecars:
        telemetry = _sum(telemetry, s.get("telemetry", {})) if telemetry else s.get("telemetry", {})
    connections: dict[str, int] = {}
    for s in sidecars:
        for name, n in s.get("connections_open", {}).items():
            connections[name] = connections.get(name, 0) + n
    registrations = [s["registration"] for s in sidecars if s.get("registration")]
    return {
        "workers_up": len(up),
        "ready": len(up) == len(states) and all(s.get("ready") for s in sidecars),
        "generations": sorted({s.get("generation", 0) for s in sidecars}),
        "services": sorted({name for s in up for name in s.get("services", {})}),
        "in_flight": sum(s.get("in_flight", 0) for s in sidecars),
        "connections_open": connections,
        "registrations": registrations,
        "telemetry": telemetry,
    }


def supervise(sidecar: Any, count: int, obj: Any, backend: str, log_level: str, source: str) -> int:
    """`meshcore run --workers N` (N > 1): the supervisor's process, given the Sidecar the
    config built (checked here, run by the workers); returns the exit code."""
    import click

    from .._backends import run

    settings = sidecar.settings
    for name in ("outbound", "inbound"):
        if settings[name].port == 0:
            raise ConfigError(
                f"port 0 with --workers {count}: every worker would get a port of its own; "
                "give a fixed port",
                source=source, path=f"sidecar.{name}",
            )
    options: list[str] = []
    if obj.config_path is not None:
        options += ["-c", str(obj.config_path)]
    for plugin in obj.cli_plugins:
        options += ["-p", plugin]

    def command(index: int, directory: Path) -> list[str]:
        return [
            sys.executable, "-m", "meshcore", *options, "run", "--backend", backend,
            "--log-level", log_level, "--worker-of", str(os.getpid()),
            "--worker-index", str(index), "--worker-dir", str(directory),
        ]

    supervisor = Supervisor(
        count, settings.admin, command, drain=settings.drain, source=source,
        admin_hosts=settings.admin_hosts, admin_peers=settings.admin_peers,
        admin_peer_timeout=settings.admin_peer_timeout,
    )

    def ready(address: Address) -> None:
        click.echo(f"meshcore: supervisor of {count} workers, admin {address}", err=True)

    async def main() -> int:
        return await supervisor.run(ready)

    code: int = run(main, backend)
    return code
